package fs

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/cache"
	"github.com/streamer-dev/streamer/fetcher"
)

// RangeReader reads byte ranges of blobs; *fetcher.Client satisfies it.
type RangeReader interface {
	// ReadRangeInto reads the len(buf) bytes at off of blob into buf,
	// calling pace (when not nil) between steps of the body.
	ReadRangeInto(ctx context.Context, ref fetcher.Ref, blob digest.Digest, off int64, buf []byte, pace func()) error
}

// cause says why bytes were fetched, for metrics and scheduling.
type cause int

// Causes, highest priority first.
const (
	causeOnDemand cause = iota
	causePrefetch
	causeBackground
	numCauses
)

func (c cause) String() string {
	switch c {
	case causeOnDemand:
		return "on_demand"
	case causePrefetch:
		return "prefetch"
	default:
		return "background"
	}
}

// remoteReader reads the chunks of one layer's streaming blob from its
// registry through the chunk cache. Every chunk is verified against its
// digest before it is returned or stored. What the filesystem asks for is
// on-demand work: it takes the host's foreground slots, which background
// work never holds.
type remoteReader struct {
	src         RangeReader
	ref         fetcher.Ref
	blob        digest.Digest
	cache       *cache.Store
	host        *hostPool // foreground slots and load of the registry host
	maxCoalesce int64
	log         *logrus.Entry
	stats       *counters
	layer       *layerStats // per layer, for status
	// missed, when set, is told of each on-demand fetch (its last
	// chunk) as it starts: the layer's read-ahead.
	missed func(last artifact.Chunk)
}

// counters are shared by all layers of a Manager.
type counters struct {
	fetchedBytes  atomic.Int64 // compressed bytes read from registries
	fetchRequests atomic.Int64
	badChunks     atomic.Int64
	pushedBytes   atomic.Int64            // written into the page cache
	byCause       [numCauses]atomic.Int64 // compressed bytes per cause
	layersBad     atomic.Int64            // layers whose tar failed the diffID check
	latency       histogram               // of range requests
	fuse          FUSEStats               // FUSE requests of the mounts
}

// layerStats counts the fetches of one layer, for its status.
type layerStats struct {
	fetched atomic.Int64 // compressed bytes
	rate    rateWindow
}

var (
	_ ChunkReader  = (*remoteReader)(nil)
	_ ChunksReader = (*remoteReader)(nil)
)

// ReadChunk returns one chunk, from the cache or fetched once however
// many readers ask for it at the same time.
func (r *remoteReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	return r.cache.Do(ctx, c.Digest, func(ctx context.Context) ([]byte, error) {
		out, err := r.fetchRun(ctx, []artifact.Chunk{c}, causeOnDemand)
		if err != nil {
			return nil, err
		}
		return out[0], nil
	})
}

// ReadChunks returns adjacent chunks; the ones missing from the cache are
// fetched in as few range requests as maxCoalesce allows.
func (r *remoteReader) ReadChunks(ctx context.Context, cs []artifact.Chunk) ([][]byte, error) {
	out := make([][]byte, len(cs))
	var missing []int
	for i, c := range cs {
		if b, ok := r.cache.Get(c.Digest); ok {
			out[i] = b
			continue
		}
		missing = append(missing, i)
	}
	for len(missing) > 0 {
		run := r.nextRun(cs, missing, 0)
		missing = missing[len(run):]
		if len(run) == 1 {
			b, err := r.ReadChunk(ctx, cs[run[0]])
			if err != nil {
				return nil, err
			}
			out[run[0]] = b
			continue
		}
		chunks := make([]artifact.Chunk, len(run))
		for k, j := range run {
			chunks[k] = cs[j]
		}
		bs, err := r.fetchAndStore(ctx, chunks, causeOnDemand, true)
		if err != nil {
			return nil, err
		}
		for k, j := range run {
			out[j] = bs[k]
		}
	}
	return out, nil
}

// nextRun returns the longest prefix of idx (indexes into cs, ascending)
// whose frames are back to back, or apart by at most gap compressed bytes
// (cs holding the chunks between), up to maxCoalesce compressed bytes
// from its first frame to its last.
func (r *remoteReader) nextRun(cs []artifact.Chunk, idx []int, gap int64) []int {
	run := idx[:1]
	start := cs[idx[0]].CompressedOffset
	for _, j := range idx[1:] {
		prev := cs[run[len(run)-1]]
		c := cs[j]
		between := c.CompressedOffset - (prev.CompressedOffset + prev.CompressedSize)
		if between < 0 || between > gap || (between > 0 && !framesBetween(cs, run[len(run)-1], j)) || c.CompressedOffset+c.CompressedSize-start > r.maxCoalesce {
			break
		}
		run = idx[:len(run)+1]
	}
	return run
}

// framesBetween reports whether the chunks of cs between i and j fill
// the blob from the end of i to the start of j.
func framesBetween(cs []artifact.Chunk, i, j int) bool {
	for k := i + 1; k <= j; k++ {
		if cs[k-1].CompressedOffset+cs[k-1].CompressedSize != cs[k].CompressedOffset {
			return false
		}
	}
	return true
}

// storeStep is how many bytes of a background run are written to the
// cache between two looks at the pods (one pack of small chunks, or a
// large chunk's file).
const storeStep = 1 << 20

// fetchAndStore fetches back-to-back chunks with one request and puts
// them in the cache. Without keep, it returns no chunk: they are decoded
// into recycled buffers, given back once stored (background and prefetch
// runs: a new slice per chunk would make the garbage collector run, on
// any CPU and at the daemon's priority, once per few hundred MiB
// fetched).
func (r *remoteReader) fetchAndStore(ctx context.Context, cs []artifact.Chunk, why cause, keep bool) ([][]byte, error) {
	start := time.Now()
	b, err := r.readRun(ctx, cs, why)
	if err != nil {
		return nil, err
	}
	defer putChunkBuf(b)
	read := time.Since(start)
	if why != causeOnDemand && r.log.Logger.IsLevelEnabled(logrus.DebugLevel) {
		// Built only when it is logged: a map and its fields per run.
		defer func() {
			r.log.WithFields(logrus.Fields{"op": "fetch-run", "cause": why.String(), "chunk": cs[0].Digest, "chunks": len(cs), "bytes": len(b),
				"read_ms": read.Milliseconds(), "rest_ms": (time.Since(start) - read).Milliseconds()}).WithFields(budgetLog(ctx)).Debug("run fetched and stored")
		}()
	}
	if why == causeBackground {
		// Decompressing, hashing and writing a background run is the
		// daemon's heaviest CPU work: it takes one of backgroundCPU's
		// slots, so that FUSE requests always find a P, once the pods
		// are not busy (they may have become so during the read; the
		// run's wait before its request and this one share a budget).
		r.host.s.pods.wait(ctx, fgMaxYield)
		release, err := takeBackgroundCPU(ctx)
		if err != nil {
			return nil, err
		}
		defer release()
	}
	bs, err := r.decodeRun(ctx, cs, b, why, !keep)
	if err != nil {
		return nil, err
	}
	if !keep {
		defer func() {
			for _, b := range bs {
				putChunkBuf(b)
			}
		}()
	}
	// Background chunks are not read now: they go to disk only, so that
	// the memory cache keeps what is read. decodeRun checked every chunk
	// against its digest. Small chunks go into pack files: a file each
	// cost the filesystem more than their bytes. A background run is
	// stored storeStep bytes at a time, pausing for busy pods before each:
	// the kernel copying a run of large chunks into the page cache is tens
	// of milliseconds of CPU that nothing can interrupt.
	cold := why == causeBackground
	ds := make([]digest.Digest, len(cs))
	for i, c := range cs {
		ds[i] = c.Digest
	}
	for start := 0; start < len(cs); {
		end := len(cs)
		if cold {
			podPause(ctx)
			var n int64
			for end = start; end < len(cs) && (end == start || n+int64(len(bs[end])) <= storeStep); end++ {
				n += int64(len(bs[end]))
			}
		}
		// PutVerifiedRun keeps no slice of bs (the memory tier takes
		// copies).
		if err := r.cache.PutVerifiedRun(ds[start:end], bs[start:end], cold); err != nil {
			// The bytes are verified: they are served even when the
			// disk refuses them (a full disk only stops caching).
			msg := "cache chunks"
			if errors.Is(err, syscall.ENOSPC) {
				msg = "cache disk full: chunks served from the network, not cached"
			}
			r.log.WithError(err).WithFields(logrus.Fields{"chunk": cs[start].Digest, "chunks": end - start, "op": "cache-put"}).Warn(msg)
		}
		start = end
	}
	if !keep {
		return nil, nil
	}
	return bs, nil
}

// fetchRun reads the frames of back-to-back chunks with one range request
// and verifies each. On-demand requests take one of the host's foreground
// slots and make background work yield while they run.
func (r *remoteReader) fetchRun(ctx context.Context, cs []artifact.Chunk, why cause) ([][]byte, error) {
	b, err := r.readRun(ctx, cs, why)
	if err != nil {
		return nil, err
	}
	defer putChunkBuf(b)
	return r.decodeRun(ctx, cs, b, why, false)
}

// readRun reads the frames of back-to-back chunks with one range request,
// into a buffer of chunkBufs the caller gives back once decoded. A
// background run's body is read a step at a time with a podPause between
// steps, as its decoding is: at a gigabit, the copies off the socket are
// milliseconds of CPU per range.
func (r *remoteReader) readRun(ctx context.Context, cs []artifact.Chunk, why cause) ([]byte, error) {
	first, last := cs[0], cs[len(cs)-1]
	off := first.CompressedOffset
	n := last.CompressedOffset + last.CompressedSize - off
	if why == causeOnDemand {
		if r.missed != nil {
			r.missed(last)
		}
		done, err := r.host.foreground(ctx)
		if err != nil {
			return nil, fmt.Errorf("wait to fetch chunk %s: %w", first.Digest, err)
		}
		defer done()
	}
	var pace func()
	var paused time.Duration // not the registry's: left out of the latency
	if why == causeBackground {
		pace = func() {
			at := time.Now()
			podPause(ctx)
			paused += time.Since(at)
		}
	}
	b := getChunkBuf(n)[:n]
	start := time.Now()
	if err := r.src.ReadRangeInto(ctx, r.ref, r.blob, off, b, pace); err != nil {
		putChunkBuf(b)
		return nil, fmt.Errorf("fetch %d chunks at %d of blob %s: %w", len(cs), off, r.blob, err)
	}
	r.stats.latency.observe(time.Since(start) - paused)
	r.stats.fetchRequests.Add(1)
	r.stats.fetchedBytes.Add(int64(len(b)))
	r.stats.byCause[why].Add(int64(len(b)))
	if r.layer != nil {
		r.layer.fetched.Add(int64(len(b)))
		r.layer.rate.add(time.Now(), int64(len(b)))
	}
	return b, nil
}

// decodeRun decompresses the frames b of chunks cs (read by readRun) and
// checks each against its digest, into buffers of chunkBufs when pooled
// (the caller gives them back).
func (r *remoteReader) decodeRun(ctx context.Context, cs []artifact.Chunk, b []byte, why cause, pooled bool) ([][]byte, error) {
	off := cs[0].CompressedOffset
	out := make([][]byte, len(cs))
	for i, c := range cs {
		if why == causeBackground {
			podPause(ctx)
		}
		lo := c.CompressedOffset - off
		var dst []byte
		if pooled {
			dst = getChunkBuf(c.Size)
		} else {
			dst = make([]byte, 0, c.Size)
		}
		data, err := artifact.DecodeChunkTo(c, b[lo:lo+c.CompressedSize], dst)
		if err != nil {
			if pooled {
				putChunkBuf(dst)
				for _, d := range out[:i] {
					putChunkBuf(d)
				}
			}
			// Bytes that do not decompress or do not match the digest
			// are equally untrusted.
			r.stats.badChunks.Add(1)
			r.log.WithError(err).WithFields(logrus.Fields{"chunk": c.Digest, "op": "verify", "cause": why.String()}).Error("chunk failed verification; not served, not cached")
			return nil, fmt.Errorf("verify chunk %s of blob %s: %w", c.Digest, r.blob, err)
		}
		out[i] = data
	}
	return out, nil
}
