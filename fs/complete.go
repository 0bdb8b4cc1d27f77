package fs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/artifact"
)

// errChunksMissing: a layer cannot be verified yet, some chunks are not
// cached.
var errChunksMissing = errors.New("chunks missing from the cache")

// layerState is one mounted layer, shared by all its mounts: its record,
// TOC, reader and background job.
type layerState struct {
	m        *Manager
	layer    digest.Digest
	image    string // image reference it was mounted for
	rec      layerRecord
	toc      *artifact.TOC
	reader   *remoteReader
	job      *layerJob // nil when the layer was complete at mount
	pool     *hostPool
	log      *logrus.Entry
	stats    layerStats
	mounted  time.Time
	refs     int // mounts; guarded by Manager.mu
	complete atomic.Bool
	bad      atomic.Bool
	// completedAt is when complete was set (unix nanoseconds).
	completedAt atomic.Int64
	// cachedMemo keeps the last count of cachedBytes for the status
	// (statusCountEvery).
	cachedMemo struct {
		sync.Mutex
		at time.Time
		n  int64
	}
}

// statusCountEvery bounds how often the status counts a layer's cached
// chunks: a base layer has tens of thousands, and a poll every 100 ms
// would spend a few percent of the daemon's CPU on it while the
// background fetch wants it.
const statusCountEvery = time.Second

// statusCachedBytes is cachedBytes for the status: at most
// statusCountEvery old.
func (st *layerState) statusCachedBytes(now time.Time) int64 {
	if st.complete.Load() {
		return st.toc.TarSize
	}
	memo := &st.cachedMemo
	memo.Lock()
	defer memo.Unlock()
	if memo.at.IsZero() || now.Sub(memo.at) >= statusCountEvery {
		memo.n, _ = st.cachedBytes()
		memo.at = now
	}
	return memo.n
}

// markComplete records that every chunk is cached and verified.
func (st *layerState) markComplete() {
	st.completedAt.Store(time.Now().UnixNano())
	st.complete.Store(true)
}

// cachedBytes returns the uncompressed bytes of the layer's chunks held in
// the cache, and whether all of them are.
func (st *layerState) cachedBytes() (int64, bool) {
	if st.complete.Load() {
		// Its chunks are pinned while it is mounted: no need to ask the
		// cache for each of them (tens of thousands in a base layer) on
		// every status request.
		return st.toc.TarSize, true
	}
	var n int64
	all := true
	for _, c := range st.toc.Chunks {
		if st.m.opts.Cache.Has(c.Digest) {
			n += c.Size
		} else {
			all = false
		}
	}
	return n, all
}

// verify rebuilds the layer's uncompressed tar from the cached chunks, in
// order, and checks it against the layer's diffID (the image config's,
// which the converter checked the TOC against). It marks the layer
// complete, or bad on mismatch. It returns errChunksMissing when the
// layer is not all cached.
func (st *layerState) verify(ctx context.Context) error {
	if st.complete.Load() || st.bad.Load() {
		return nil
	}
	if _, all := st.cachedBytes(); !all {
		return errChunksMissing
	}
	start := time.Now()
	want := st.toc.DiffID
	if err := want.Validate(); err != nil {
		return fmt.Errorf("verify layer %s: diffID %q: %w", st.layer, want, err)
	}
	h := want.Algorithm().Digester()
	var pos int64
	// One buffer for every chunk read from disk: the check keeps none,
	// and a new slice per chunk would make the daemon's garbage collector
	// run (on any CPU, at the daemon's priority) once per few hundred MiB
	// checked.
	var buf []byte
	for i, c := range st.toc.Chunks {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("verify layer %s: %w", st.layer, err)
		}
		// A check in the background gives way to busy pods (ctx
		// carries its budget); others do not wait.
		podPause(ctx)
		if c.Offset != pos {
			return st.markBad(fmt.Sprintf("chunk %d starts at %d, want %d", i, c.Offset, pos))
		}
		// Not checked chunk by chunk here: the tar's digest covers every
		// byte, and a mismatch looks at the chunks again below.
		if int64(cap(buf)) < c.Size {
			buf = make([]byte, c.Size)
		}
		b, ok := st.m.opts.Cache.ReadColdUnchecked(c.Digest, buf)
		if !ok {
			return errChunksMissing
		}
		h.Hash().Write(b)
		pos += int64(len(b))
	}
	if pos != st.toc.TarSize {
		if st.chunksDamaged() {
			return errChunksMissing
		}
		return st.markBad(fmt.Sprintf("chunks hold %d tar bytes, want %d", pos, st.toc.TarSize))
	}
	if got := h.Digest(); got != want {
		if st.chunksDamaged() {
			return errChunksMissing
		}
		return st.markBad(fmt.Sprintf("tar rebuilt from its chunks has digest %s, want diffID %s", got, want))
	}
	st.rec.Complete = true
	if err := st.m.writeRecord(st.layer, st.rec); err != nil {
		// Still complete for this daemon's life; a restart checks again.
		st.log.WithError(err).Warn("record layer complete")
	}
	st.markComplete()
	st.log.WithFields(logrus.Fields{"op": "verify", "bytes": pos, "took": time.Since(start).Round(time.Millisecond)}).Info("layer complete: every chunk cached and the tar matches its diffID")
	return nil
}

// chunksDamaged checks each cached chunk of the layer against its digest
// (the cache removes those that fail), so that a chunk damaged on disk is
// fetched again rather than taken for a TOC that does not describe the
// layer. It reports whether any was missing or damaged.
func (st *layerState) chunksDamaged() bool {
	damaged := false
	for _, c := range st.toc.Chunks {
		if _, ok := st.m.opts.Cache.GetCold(c.Digest); !ok {
			damaged = true
		}
	}
	if damaged {
		st.log.WithField("op", "verify").Warn("cached chunks of the layer were damaged on disk; fetching them again before checking the layer")
	}
	return damaged
}

// markBad records that the layer failed its diffID check: the mount that
// is there keeps serving verified chunks, but the next mount falls back to
// an ordinary pull.
func (st *layerState) markBad(why string) error {
	st.bad.Store(true)
	st.m.stats.layersBad.Add(1)
	st.rec.Bad = why
	st.log.WithFields(logrus.Fields{"op": "verify", "diffID": st.toc.DiffID}).Errorf("LAYER FAILED VERIFICATION: %s; its TOC does not describe the image's layer; the next mount pulls it normally", why)
	if err := st.m.writeRecord(st.layer, st.rec); err != nil {
		return fmt.Errorf("record layer %s as bad: %w", st.layer, err)
	}
	return nil
}

func (m *Manager) writeRecord(layer digest.Digest, rec layerRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return writeAtomic(recordPath(m.opts.Root, layer), b)
}

// LayerStatus describes a mounted layer: what the status API serves.
type LayerStatus struct {
	// Image is the reference the layer was mounted for.
	Image string `json:"image"`
	// Layer is the original layer digest.
	Layer digest.Digest `json:"layer"`
	// Mounts is how many mountpoints serve it.
	Mounts int `json:"mounts"`
	// CompressedSize is the streaming blob's size; UncompressedSize the tar's.
	CompressedSize   int64 `json:"compressedSize"`
	UncompressedSize int64 `json:"uncompressedSize"`
	// CachedBytes are the uncompressed bytes of its chunks in the cache;
	// FetchedPercent is CachedBytes of UncompressedSize.
	CachedBytes    int64   `json:"cachedBytes"`
	FetchedPercent float64 `json:"fetchedPercent"`
	// Complete: every chunk cached and the tar checked against its diffID.
	Complete bool `json:"complete"`
	// Bad: the tar failed its diffID check.
	Bad bool `json:"bad,omitempty"`
	// FetchedBytes are the compressed bytes fetched for it since mount;
	// FetchRate the bytes per second fetched over the last 10 s.
	FetchedBytes int64   `json:"fetchedBytes"`
	FetchRate    float64 `json:"fetchRate"`
	// MountedAt is when this daemon mounted it first; CompletedAt when it
	// became complete (its mount time if it was complete then).
	MountedAt   time.Time  `json:"mountedAt"`
	CompletedAt *time.Time `json:"completedAt,omitempty"`
}

// Status is the state of every layer mounted now, by image then layer.
func (m *Manager) Status() []LayerStatus {
	m.mu.Lock()
	states := make([]*layerState, 0, len(m.layers))
	refs := make([]int, 0, len(m.layers))
	for _, st := range m.layers {
		states = append(states, st)
		refs = append(refs, st.refs)
	}
	m.mu.Unlock()
	now := time.Now()
	out := make([]LayerStatus, 0, len(states))
	for i, st := range states {
		cached := st.statusCachedBytes(now)
		s := LayerStatus{
			Image:            st.image,
			Layer:            st.layer,
			Mounts:           refs[i],
			CompressedSize:   st.toc.BlobSize,
			UncompressedSize: st.toc.TarSize,
			CachedBytes:      cached,
			FetchedPercent:   100,
			Complete:         st.complete.Load(),
			Bad:              st.bad.Load(),
			FetchedBytes:     st.stats.fetched.Load(),
			FetchRate:        st.stats.rate.perSecond(now),
			MountedAt:        st.mounted,
		}
		if at := st.completedAt.Load(); s.Complete && at != 0 {
			t := time.Unix(0, at)
			s.CompletedAt = &t
		}
		if s.UncompressedSize > 0 {
			s.FetchedPercent = 100 * float64(cached) / float64(s.UncompressedSize)
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Image != out[j].Image {
			return out[i].Image < out[j].Image
		}
		return out[i].Layer < out[j].Layer
	})
	return out
}
