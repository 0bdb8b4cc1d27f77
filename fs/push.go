package fs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/artifact"
)

// Pushing listed files into the page cache.
//
// A program maps its shared libraries and takes their code pages as it
// first runs each path: on a pulled image those faults are served by the
// page cache (the files were just written), on a FUSE mount each one is a
// request to this daemon, at a time the daemon may be busy with the
// background fetch. The first requests a service answers run code paths
// its startup did not, so they pay for many such faults. When a process
// first opens a large file of the layer's prefetch list, the filesystem
// therefore writes the whole file into the kernel's page cache with
// FUSE_NOTIFY_STORE, from the chunks the prefetch fetched (or fetches):
// later faults and reads of it are served by the kernel, as on a pulled
// image.
const (
	// notifyStore is FUSE_NOTIFY_STORE (include/uapi/linux/fuse.h).
	notifyStore = 4
	// notifyStoreOutSize is struct fuse_notify_store_out: nodeid,
	// offset, size, padding.
	notifyStoreOutSize = 24
	// pushMin is the smallest file pushed: a smaller one is read whole
	// by one FUSE request anyway (the kernel's read-ahead is maxIO).
	pushMin = maxIO
	// pushConcurrency bounds the files of one layer pushed at once.
	pushConcurrency = 2
	// pushRetry and pushWait: how often, and how long, a push waits for
	// the prefetch to bring the rest of a file.
	pushRetry = 100 * time.Millisecond
	pushWait  = 2 * time.Minute
)

// pusher pushes a layer's listed files into the page cache, each once,
// when first opened.
type pusher struct {
	listed map[uint64]*atomic.Bool     // inode of a listed file -> pushed (or pushing)
	parts  map[uint64][]artifact.Range // the parts of a listed file its list gives, if not all
	sem    chan struct{}
	conn   atomic.Pointer[conn]
	bytes  atomic.Int64  // bytes written into the page cache
	total  *atomic.Int64 // Options.PushedBytes, or nil
	files  atomic.Int64  // files pushed (whole or their listed parts)
}

// newPusher returns the pusher of the files of toc's prefetch list at
// least pushMin bytes large, found among nodes; nil when there are none.
func newPusher(toc *artifact.TOC, nodes []*tnode, total *atomic.Int64) *pusher {
	if len(toc.Prefetch) == 0 {
		return nil
	}
	ranges := toc.PrefetchRangeMap()
	names := make(map[string][]artifact.Range, len(toc.Prefetch))
	for _, p := range toc.Prefetch {
		if name, ok := cleanName(p); ok {
			names[name] = ranges[p]
		}
	}
	p := &pusher{listed: map[uint64]*atomic.Bool{}, parts: map[uint64][]artifact.Range{}, sem: make(chan struct{}, pushConcurrency), total: total}
	for _, n := range nodes {
		if n == nil || n.kind != unix.S_IFREG || n.entry == nil || n.entry.Size < pushMin {
			continue
		}
		name, ok := cleanName(n.entry.Name)
		if !ok {
			continue
		}
		if rs, listed := names[name]; listed {
			p.listed[n.ino] = new(atomic.Bool)
			if rs != nil {
				p.parts[n.ino] = rs
			}
		}
	}
	if len(p.listed) == 0 {
		return nil
	}
	return p
}

// opened starts pushing n if it is listed and not pushed yet.
func (fs *rawFS) opened(n *tnode) {
	p := fs.layer.push
	if p == nil {
		return
	}
	done, ok := p.listed[n.ino]
	if !ok || !done.CompareAndSwap(false, true) {
		return
	}
	if pn, ok := fs.layer.reader.(pushNoter); ok {
		pn.pushing(n.entry, p.parts[n.ino])
	}
	go fs.pushFile(n)
}

// pushNoter is a ChunkReader that is told of the files pushed into the
// page cache: the kernel serves their pushed parts without asking the
// filesystem, so a startup profile would not see those reads.
type pushNoter interface {
	// pushing says the parts of e (nil: all of it) are being pushed
	// because a process opened e.
	pushing(e *artifact.Entry, parts []artifact.Range)
}

// noRecord marks reads that are not the workload's own (pushes), so that
// they stay out of the image's startup profile.
type noRecord struct{}

// pushFile writes n's bytes (the pieces of them holding the parts its list
// gives, when it gives parts) into the kernel's page cache, maxIO at a
// time, from chunks already cached: it never fetches, so it cannot put a
// large listed file (a JVM's modules image) ahead of the startup's reads.
// Pieces whose chunks are not cached yet are tried again every pushRetry
// while the prefetch brings them, for up to pushWait; a piece the process
// reads first is in the page cache by then anyway. It stops at the first
// failure; the file is then read through FUSE as usual.
func (fs *rawFS) pushFile(n *tnode) {
	l := fs.layer
	log := l.log.WithFields(logrus.Fields{"op": "push", "file": n.entry.Name})
	start := time.Now()
	var pending []int64
	var bytes int64 // of the pieces pushed
	parts := l.push.parts[n.ino]
	for off := int64(0); off < n.entry.Size; off += maxIO {
		if parts == nil || slices.ContainsFunc(parts, func(r artifact.Range) bool { return r.Offset < off+maxIO && off < r.End() }) {
			pending = append(pending, off)
			bytes += min(maxIO, n.entry.Size-off)
		}
	}
	buf := make([]byte, maxIO)
	for {
		later, err := fs.pushPass(n, pending, buf)
		if err != nil {
			// ENOENT: the kernel forgot the inode; ENODEV or closed:
			// unmounted.
			log.WithError(err).Debug("page cache push stopped")
			return
		}
		if pending = later; len(pending) == 0 {
			break
		}
		if time.Since(start) > pushWait {
			log.WithField("left", int64(len(pending))*maxIO).Debug("page cache push gave up: the file's chunks were not cached in time")
			return
		}
		time.Sleep(pushRetry)
	}
	l.push.files.Add(1)
	log.WithFields(logrus.Fields{"bytes": bytes, "size": n.entry.Size, "took": time.Since(start)}).Debug("file pushed into the page cache")
}

// pushPass pushes the pieces of n at offsets pending whose chunks are
// cached, and returns the others.
func (fs *rawFS) pushPass(n *tnode, pending []int64, buf []byte) (later []int64, err error) {
	l := fs.layer
	p := l.push
	p.sem <- struct{}{}
	defer func() { <-p.sem }()
	c := p.conn.Load()
	if c == nil {
		return nil, errors.New("no connection")
	}
	ctx := context.WithValue(context.Background(), noRecord{}, true)
	for _, off := range pending {
		k := min(maxIO, n.entry.Size-off)
		if !l.cached(n.entry.Offset+off, k) {
			later = append(later, off)
			continue
		}
		data, _, err := l.readRange(ctx, 0, n.entry.Offset+off, k, buf)
		if err != nil {
			return nil, err
		}
		if err := c.notifyStore(n.ino, off, data); err != nil {
			return nil, err
		}
		p.bytes.Add(k)
		if p.total != nil {
			p.total.Add(k)
		}
	}
	if len(later) > 0 && c.isClosed() {
		return nil, fmt.Errorf("push into node %d: %w", n.ino, os.ErrClosed)
	}
	return later, nil
}

// cached reports whether the chunks of tar bytes [off, off+n) can be read
// without the registry; true when the reader keeps no cache of its own.
func (l *layer) cached(off, n int64) bool {
	cc, ok := l.reader.(chunkCacher)
	if !ok {
		return true
	}
	first, last := l.toc.ChunkRange(off, n)
	for _, c := range l.toc.Chunks[first:last] {
		if !cc.cached(c) {
			return false
		}
	}
	return true
}

// chunkCacher is implemented by readers that keep chunks locally.
type chunkCacher interface {
	cached(c artifact.Chunk) bool
}

func (r *remoteReader) cached(c artifact.Chunk) bool { return r.cache.Has(c.Digest) }

func (rr *recordingReader) cached(c artifact.Chunk) bool { return rr.r.cached(c) }

// notifyStore writes data into the page cache of node id at offset off.
func (c *conn) notifyStore(id uint64, off int64, data []byte) error {
	var h [outHeaderSize + notifyStoreOutSize]byte
	binary.LittleEndian.PutUint32(h[0:4], uint32(len(h)+len(data)))
	binary.LittleEndian.PutUint32(h[4:8], notifyStore) // unique 0: a notification
	binary.LittleEndian.PutUint64(h[16:24], id)
	binary.LittleEndian.PutUint64(h[24:32], uint64(off))
	binary.LittleEndian.PutUint32(h[32:36], uint32(len(data)))
	n, err := c.writev(h[:], data)
	if err != nil {
		return fmt.Errorf("FUSE_NOTIFY_STORE of %d bytes at %d into node %d: %w", len(data), off, id, err)
	}
	if n != len(h)+len(data) {
		return fmt.Errorf("FUSE_NOTIFY_STORE of %d bytes at %d into node %d: short write (%d bytes)", len(data), off, id, n)
	}
	return nil
}

// setConn makes c the connection pushes are written to.
func (fs *rawFS) setConn(c *conn) {
	if fs.layer.push != nil {
		fs.layer.push.conn.Store(c)
	}
}
