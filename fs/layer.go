// Package fs serves one streaming layer as a read-only FUSE filesystem built
// from its table of contents, reading file data chunk by chunk on demand.
//
// The tree follows overlayfs conventions for whiteouts so that the
// snapshotter can stack layer mounts as overlayfs lower directories: a
// ".wh.NAME" entry becomes a character device 0/0 named NAME, and a
// ".wh..wh..opq" marker sets the "trusted.overlay.opaque" xattr of its
// directory.
package fs

import (
	"context"
	"fmt"
	"path"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/artifact"
)

// ChunkReader returns the verified uncompressed bytes of chunks of a layer.
// Implementations must honour ctx: a read abandoned by the filesystem (on
// timeout or interrupt) should stop as soon as possible.
type ChunkReader interface {
	ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error)
}

// ChunksReader is optionally implemented by a ChunkReader to fetch several
// adjacent chunks in one request (coalescing). It returns one slice per
// chunk, in order.
type ChunksReader interface {
	ReadChunks(ctx context.Context, cs []artifact.Chunk) ([][]byte, error)
}

// Defaults of Options. Long kernel cache timeouts are safe: layer content is
// immutable.
const (
	DefaultReadTimeout  = 30 * time.Second
	DefaultEntryTimeout = time.Hour
	DefaultAttrTimeout  = time.Hour
	DefaultFSName       = "streamer"
)

// Overlayfs whiteout conventions (see the package documentation).
const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
	// metaPrefix starts AUFS metadata names (".wh..wh.plnk"), which
	// describe no file and are ignored, as containerd does.
	metaPrefix  = ".wh..wh."
	opaqueXattr = "trusted.overlay.opaque"
)

// Options configure a layer filesystem. The zero value works.
type Options struct {
	// ReadTimeout bounds each read: a read that cannot get its data within
	// it fails with EIO. Default DefaultReadTimeout.
	ReadTimeout time.Duration
	// EntryTimeout and AttrTimeout are how long the kernel caches names and
	// attributes; NegativeTimeout how long it caches failed lookups.
	// Defaults: one hour each (content is immutable).
	EntryTimeout, AttrTimeout, NegativeTimeout time.Duration
	// Logger carries the caller's fields (image, layer). Default: the
	// standard logrus logger with the TOC's layer digest.
	Logger *logrus.Entry
	// FSName is the source shown in /proc/mounts. Default DefaultFSName.
	FSName string
	// Debug logs every FUSE request.
	Debug bool
	// Push writes each file of the layer's prefetch list at least 1 MiB
	// large into the kernel's page cache when a process first opens it
	// (see push.go).
	Push bool
	// PushedBytes, when set, is added the bytes pushed, for a caller
	// that counts over layers.
	PushedBytes *atomic.Int64
	// FUSEStats, when set, times the mount's FUSE requests by operation.
	FUSEStats *FUSEStats
	// Holder keeps the mount's /dev/fuse descriptor across restarts of
	// the daemon. Default: the one set by SetDefaultHolder, if any.
	Holder Holder
}

func (o Options) withDefaults(toc *artifact.TOC) Options {
	if o.ReadTimeout <= 0 {
		o.ReadTimeout = DefaultReadTimeout
	}
	if o.EntryTimeout <= 0 {
		o.EntryTimeout = DefaultEntryTimeout
	}
	if o.AttrTimeout <= 0 {
		o.AttrTimeout = DefaultAttrTimeout
	}
	if o.NegativeTimeout <= 0 {
		o.NegativeTimeout = DefaultEntryTimeout
	}
	if o.Logger == nil {
		o.Logger = logrus.NewEntry(logrus.StandardLogger()).WithField("layer", toc.Layer.String())
	}
	if o.FSName == "" {
		o.FSName = DefaultFSName
	}
	return o
}

// Stats counts what a layer filesystem served.
type Stats struct {
	Reads       int64 // FUSE read requests answered with data
	BytesServed int64 // bytes returned by those reads
	Errors      int64 // reads that failed (EIO or EINTR)
	// PushedFiles and PushedBytes count the listed files written (whole,
	// or the parts their list gives), and the bytes written, into the
	// kernel's page cache (Options.Push).
	PushedFiles, PushedBytes int64
}

// layer is the state shared by all nodes of one mounted layer.
type layer struct {
	toc    *artifact.TOC
	reader ChunkReader
	multi  ChunksReader // nil unless reader implements it
	opts   Options
	log    *logrus.Entry

	entries int // names in the tree, for statfs

	reads, bytes, errors atomic.Int64
	failures             failures
	push                 *pusher // nil: no listed file is pushed (set by newRawFS)
}

func (l *layer) stats() Stats {
	s := Stats{Reads: l.reads.Load(), BytesServed: l.bytes.Load(), Errors: l.errors.Load()}
	if l.push != nil {
		s.PushedFiles, s.PushedBytes = l.push.files.Load(), l.push.bytes.Load()
	}
	return s
}

// NewRoot returns the root node of the filesystem of one layer, for
// embedding in a go-fuse server (Mount does this). The tree is built from
// toc when the root is added to the server.
func NewRoot(toc *artifact.TOC, r ChunkReader, opts Options) (gofs.InodeEmbedder, error) {
	root, err := newRoot(toc, r, opts)
	if err != nil {
		return nil, err
	}
	return root, nil
}

func newRoot(toc *artifact.TOC, r ChunkReader, opts Options) (*rootNode, error) {
	if toc == nil {
		return nil, fmt.Errorf("new layer filesystem: nil TOC")
	}
	if r == nil {
		return nil, fmt.Errorf("new layer filesystem %s: nil chunk reader", toc.Layer)
	}
	opts = opts.withDefaults(toc)
	l := &layer{toc: toc, reader: r, opts: opts, log: opts.Logger}
	if m, ok := r.(ChunksReader); ok {
		l.multi = m
	}
	t := buildTree(toc, l.log)
	l.entries = t.entries
	root := &rootNode{}
	root.layer = l
	root.tree = t
	root.attr = t.root.attr(l)
	root.xattrs = t.root.xattrs()
	return root, nil
}

// tnode is a node of the tree computed from the TOC before any inode exists.
type tnode struct {
	ino      uint64
	entry    *artifact.Entry // nil for implied directories and the root without entry
	kind     uint32          // S_IFDIR, S_IFREG... (file type bits)
	whiteout bool
	opaque   bool
	children map[string]*tnode // directories only
	names    []string          // sorted children names, set by newRawFS
	nlink    uint32
}

func (n *tnode) isDir() bool { return n.kind == syscall.S_IFDIR }

type tree struct {
	root    *tnode
	entries int // number of names in the tree, for statfs
}

// buildTree computes the directory tree of toc. It never fails: entries
// that cannot be placed (a hardlink to a missing target, a name that
// escapes the root) are logged and skipped.
func buildTree(toc *artifact.TOC, log *logrus.Entry) *tree {
	nextImplied := uint64(len(toc.Entries)) + 2
	newDir := func() *tnode {
		n := &tnode{ino: nextImplied, kind: syscall.S_IFDIR, children: map[string]*tnode{}}
		nextImplied++
		return n
	}
	t := &tree{root: &tnode{ino: fuse.FUSE_ROOT_ID, kind: syscall.S_IFDIR, children: map[string]*tnode{}}}

	// dir returns the directory at p, creating missing components (and
	// replacing non-directories, as tar extraction would).
	dir := func(p string) *tnode {
		d := t.root
		if p == "" {
			return d
		}
		for _, c := range strings.Split(p, "/") {
			ch := d.children[c]
			if ch == nil || !ch.isDir() {
				ch = newDir()
				d.children[c] = ch
			}
			d = ch
		}
		return d
	}
	lookup := func(p string) *tnode {
		d := t.root
		if p == "" {
			return d
		}
		for _, c := range strings.Split(p, "/") {
			if d.children == nil {
				return nil
			}
			if d = d.children[c]; d == nil {
				return nil
			}
		}
		return d
	}

	for i := range toc.Entries {
		e := &toc.Entries[i]
		name, ok := cleanName(e.Name)
		if !ok {
			log.WithFields(logrus.Fields{"op": "build", "entry": e.Name}).Warn("skipping entry with a name outside the layer")
			continue
		}
		if name == "" {
			if e.Type == artifact.TypeDir {
				t.root.entry = e
			}
			continue
		}
		parentPath, base := path.Split(name)
		if base != opaqueMarker && (strings.HasPrefix(name, metaPrefix) || strings.Contains(name, "/"+metaPrefix)) {
			continue
		}
		parent := dir(strings.TrimSuffix(parentPath, "/"))
		ino := uint64(i) + 2

		if base == opaqueMarker {
			parent.opaque = true
			continue
		}
		if strings.HasPrefix(base, whiteoutPrefix) {
			target := base[len(whiteoutPrefix):]
			if target == "" || target == "." || target == ".." {
				continue
			}
			if old := parent.children[target]; old != nil && !old.whiteout {
				continue // a real entry of this layer wins over its whiteout
			}
			parent.children[target] = &tnode{ino: ino, entry: e, kind: syscall.S_IFCHR, whiteout: true}
			continue
		}

		var n *tnode
		switch e.Type {
		case artifact.TypeDir:
			if old := parent.children[base]; old != nil && old.isDir() {
				old.entry = e // a repeated directory updates its metadata
				continue
			}
			n = &tnode{ino: ino, entry: e, kind: syscall.S_IFDIR, children: map[string]*tnode{}}
		case artifact.TypeHardlink:
			target, ok := cleanName(e.Linkname)
			var tn *tnode
			if ok && target != "" {
				tn = lookup(target)
			}
			if tn == nil || tn.isDir() || tn.whiteout {
				log.WithFields(logrus.Fields{"op": "build", "entry": e.Name, "target": e.Linkname}).Warn("skipping hardlink to a missing target")
				continue
			}
			n = tn
		case artifact.TypeReg:
			n = &tnode{ino: ino, entry: e, kind: syscall.S_IFREG}
		case artifact.TypeSymlink:
			n = &tnode{ino: ino, entry: e, kind: syscall.S_IFLNK}
		case artifact.TypeChar:
			n = &tnode{ino: ino, entry: e, kind: syscall.S_IFCHR}
		case artifact.TypeBlock:
			n = &tnode{ino: ino, entry: e, kind: syscall.S_IFBLK}
		case artifact.TypeFifo:
			n = &tnode{ino: ino, entry: e, kind: syscall.S_IFIFO}
		default:
			log.WithFields(logrus.Fields{"op": "build", "entry": e.Name, "type": e.Type}).Warn("skipping entry of unknown type")
			continue
		}
		parent.children[base] = n
	}

	// Link counts from the final tree: replaced entries and skipped links
	// are accounted for whatever the order of the TOC.
	var count func(d *tnode)
	count = func(d *tnode) {
		d.nlink = 2
		for _, ch := range d.children {
			t.entries++
			if ch.isDir() {
				d.nlink++
				count(ch)
			} else {
				ch.nlink++
			}
		}
	}
	count(t.root)
	return t
}

// cleanName turns a tar name into a clean relative path ("" for the root).
// It reports false for names that escape the root.
func cleanName(name string) (string, bool) {
	p := path.Clean("/" + name)
	if p == "/" {
		return "", true
	}
	p = p[1:]
	// path.Clean of an absolute path removes every "..", so only the
	// original name can reveal an escape attempt.
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", false
		}
	}
	return p, true
}

// attr returns the attributes of n; atime and ctime equal mtime.
func (n *tnode) attr(l *layer) fuse.Attr {
	var a fuse.Attr
	a.Ino = n.ino
	a.Nlink = n.nlink
	a.Blksize = blockSize
	mode := uint32(0o755)
	if e := n.entry; e != nil {
		mode = uint32(e.Mode) & 0o7777
		a.Uid = uint32(e.UID)
		a.Gid = uint32(e.GID)
		if !e.ModTime.IsZero() {
			a.SetTimes(&e.ModTime, &e.ModTime, &e.ModTime)
		}
		switch n.kind {
		case syscall.S_IFREG:
			a.Size = uint64(e.Size)
		case syscall.S_IFLNK:
			a.Size = uint64(len(e.Linkname))
		case syscall.S_IFCHR, syscall.S_IFBLK:
			if !n.whiteout {
				a.Rdev = uint32(mkdev(e.Devmajor, e.Devminor))
			}
		}
	}
	if n.whiteout {
		mode = 0
	}
	if n.isDir() {
		a.Size = blockSize
	}
	a.Blocks = (a.Size + 511) / 512
	a.Mode = n.kind | mode
	return a
}

// xattrs returns n's extended attributes, with the overlayfs opaque marker.
func (n *tnode) xattrs() map[string][]byte {
	var x map[string][]byte
	if n.entry != nil && len(n.entry.Xattrs) > 0 && !n.whiteout {
		x = make(map[string][]byte, len(n.entry.Xattrs)+1)
		for k, v := range n.entry.Xattrs {
			x[k] = v
		}
	}
	if n.opaque {
		if x == nil {
			x = map[string][]byte{}
		}
		x[opaqueXattr] = []byte("y")
	}
	return x
}

// mkdev encodes a device number as Linux does (new_encode_dev), the form
// the kernel expects in FUSE attributes.
func mkdev(major, minor int64) uint64 {
	ma, mi := uint64(major), uint64(minor)
	return (mi & 0xff) | (ma&0xfff)<<8 | (mi&^0xff)<<12 | (ma&^0xfff)<<32
}

// sortedNames returns the names of d's children in order, so that inodes are
// created deterministically.
func sortedNames(d *tnode) []string {
	names := make([]string, 0, len(d.children))
	for name := range d.children {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}
