package fs

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
	"golang.org/x/sync/singleflight"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/cache"
	"github.com/streamer-dev/streamer/fetcher"
)

// Labels containerd (CRI, or a client using snapshotters.AppendInfoHandlerWrapper)
// attaches to the snapshots of an image's layers.
const (
	LabelImageRef       = "containerd.io/snapshot/cri.image-ref"
	LabelManifestDigest = "containerd.io/snapshot/cri.manifest-digest"
	LabelLayerDigest    = "containerd.io/snapshot/cri.layer-digest"
	LabelImageLayers    = "containerd.io/snapshot/cri.image-layers"
	// LabelSnapshotRef is the chain id of the snapshot being prepared.
	LabelSnapshotRef = "containerd.io/snapshot.ref"
	// LabelParent is the parent snapshot's chain id ("" for a base layer),
	// added by the snapshotter so the layer can be bound to its image.
	LabelParent = "containerd.io/snapshot/streamer.parent"
)

// ErrNotStreamable is returned by Mount when a layer cannot be streamed (no
// artifact, lookup failed, labels missing): the caller pulls it normally.
var ErrNotStreamable = errors.New("layer not streamable")

// Registry is what the Manager needs of a registry client; *fetcher.Client
// satisfies it.
type Registry interface {
	RangeReader
	FindArtifact(ctx context.Context, ref fetcher.Ref, subject ocispec.Descriptor) (*artifact.Manifest, ocispec.Descriptor, error)
	FetchBlob(ctx context.Context, ref fetcher.Ref, desc ocispec.Descriptor) (io.ReadCloser, error)
}

// ManagerOptions configure a Manager. Zero values take the defaults noted.
type ManagerOptions struct {
	Root     string // layer records and TOCs live here
	Registry Registry
	Cache    *cache.Store
	// Concurrency bounds simultaneous on-demand range requests per
	// registry host (default 8).
	Concurrency int
	// MaxCoalesce bounds the compressed bytes of one range request (default 4 MiB).
	MaxCoalesce int64
	// ReadTimeout bounds one FUSE read (default 60s).
	ReadTimeout time.Duration
	// NegativeTTL is how long "no artifact" is remembered per manifest (default 30s).
	NegativeTTL time.Duration
	// Prefetch fetches the files of a layer's prefetch list first, as
	// soon as it mounts.
	Prefetch bool
	// PageCachePush, with Prefetch, writes each listed file of at least
	// 1 MiB into the kernel's page cache when a process first opens it
	// (fs.Options.Push).
	PageCachePush bool
	// PrefetchGap is the largest run of unlisted compressed bytes a
	// prefetch request bridges to merge the chunks of two listed files
	// into one request; 0 merges only back-to-back chunks.
	PrefetchGap int64
	// Readahead, with Background on, makes each on-demand fetch start the
	// fetch of up to this many compressed bytes of the chunks after it,
	// ahead of other background work: files next to each other in a
	// layer are read together (a package, a directory), and the bytes
	// would be fetched by the background fetch anyway. 0 turns it off.
	Readahead int64
	// Background fetches the rest of every mounted layer until it is
	// complete and verified against its diffID, so that the node stops
	// needing the registry.
	Background bool
	// BackgroundConcurrency bounds background range requests per registry
	// host (default 4); on-demand reads have their own Concurrency.
	BackgroundConcurrency int
	// BackgroundRateLimit bounds the bytes per second all background
	// requests read together; 0 is unlimited.
	BackgroundRateLimit int64
	// YieldCgroups names the cgroup holding the node's pods (the first
	// found of these names, under the v1 cpuacct hierarchy or the unified
	// one, or absolute paths): while the pods use more than YieldCPU of
	// the node's CPUs, in the last 10 ms or on average over YieldWindow
	// (default 1 s), background requests and background decoding wait
	// (see podWatch). None, or a YieldCPU of 0, turns it off.
	YieldCgroups []string
	YieldCPU     float64
	YieldWindow  time.Duration
	// RecordWindow is how long after a layer mounts the files read from
	// it are recorded, in first-read order, into its image's startup
	// profile (Profile); 0 records nothing.
	RecordWindow time.Duration
	Logger       *logrus.Entry
}

// Manager mounts the layers of streamed images: it finds an image's
// streaming artifact, keeps each layer's TOC on local disk and serves the
// layer through FUSE. A layer mounted once can be mounted again without
// the registry, from its local record (restart and reboot).
type Manager struct {
	opts    ManagerOptions
	log     *logrus.Entry
	stats   counters
	lookups singleflight.Group
	// tocs fetches each layer's TOC once however many ask (the layer's
	// mount, the warm-up of its image).
	tocs singleflight.Group
	// warm holds TOCs fetched ahead of their layer's mount; warmCtx
	// ends, and warmWG waits for, the fetches ahead.
	warm     warmTOCs
	warmCtx  context.Context
	warmStop context.CancelFunc
	warmWG   sync.WaitGroup
	sched    *scheduler
	// profiles are the startup profiles recorded per image.
	profiles profiles

	mu          sync.Mutex
	artifacts   map[digest.Digest]lookup  // by image manifest digest
	mounts      map[string]*layerMount    // by mountpoint
	decisions   map[string]*ImageDecision // by image reference
	layers      map[digest.Digest]*layerState
	mountsTotal int64
	fallbacks   int64
}

type lookup struct {
	m    *artifact.Manifest
	desc ocispec.Descriptor // the artifact manifest
	err  error
	at   time.Time
}

type layerMount struct {
	layer digest.Digest
	toc   *artifact.TOC
	fs    *Mounted
	st    *layerState
}

// layerRecord is what a layer needs to be mounted again without the registry.
type layerRecord struct {
	Ref  string              `json:"ref"`
	Blob artifact.Descriptor `json:"blob"`
	TOC  artifact.Descriptor `json:"toc"`
	// Complete: every chunk was cached and the tar rebuilt from them
	// matched the diffID.
	Complete bool `json:"complete,omitempty"`
	// Bad says why the tar rebuilt from the chunks failed its diffID
	// check: the layer is pulled normally from then on.
	Bad string `json:"bad,omitempty"`
}

// NewManager returns a Manager keeping its records under opts.Root.
func NewManager(opts ManagerOptions) (*Manager, error) {
	if opts.Registry == nil || opts.Cache == nil || opts.Root == "" {
		return nil, errors.New("new manager: root, registry and cache are required")
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 8
	}
	if opts.MaxCoalesce <= 0 {
		opts.MaxCoalesce = 4 << 20
	}
	if opts.ReadTimeout <= 0 {
		opts.ReadTimeout = 60 * time.Second
	}
	if opts.NegativeTTL <= 0 {
		opts.NegativeTTL = 30 * time.Second
	}
	if opts.BackgroundConcurrency <= 0 {
		opts.BackgroundConcurrency = 4
	}
	if opts.BackgroundRateLimit < 0 {
		opts.BackgroundRateLimit = 0
	}
	if opts.Logger == nil {
		opts.Logger = logrus.NewEntry(logrus.StandardLogger())
	}
	for _, d := range []string{recordDir(opts.Root), tocDir(opts.Root)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("new manager: %w", err)
		}
	}
	m := &Manager{
		opts: opts,
		log:  opts.Logger,
		sched: newScheduler(schedulerOptions{
			fgConcurrency: opts.Concurrency,
			bgConcurrency: opts.BackgroundConcurrency,
			maxCoalesce:   opts.MaxCoalesce,
			background:    opts.Background,
			rateLimit:     opts.BackgroundRateLimit,
			pods:          podWatchOptions{cgroups: opts.YieldCgroups, share: opts.YieldCPU, window: opts.YieldWindow},
			cache:         opts.Cache,
			log:           opts.Logger,
		}),
		artifacts: map[digest.Digest]lookup{},
		mounts:    map[string]*layerMount{},
		decisions: map[string]*ImageDecision{},
		layers:    map[digest.Digest]*layerState{},
	}
	m.warmCtx, m.warmStop = context.WithCancel(context.Background())
	return m, nil
}

// Paths under the root: one function each, nothing else builds them.
func recordDir(root string) string { return filepath.Join(root, "layers") }
func tocDir(root string) string    { return filepath.Join(root, "tocs") }
func recordPath(root string, layer digest.Digest) string {
	return filepath.Join(recordDir(root), layer.Encoded()+".json")
}
func tocPath(root string, toc digest.Digest) string {
	return filepath.Join(tocDir(root), toc.Encoded())
}

// Mount mounts the layer that labels name at mountpoint. It returns an error
// wrapping ErrNotStreamable when the layer has to be pulled normally.
func (m *Manager) Mount(ctx context.Context, mountpoint string, labels map[string]string) error {
	err := m.mount(ctx, mountpoint, labels)
	m.mu.Lock()
	defer m.mu.Unlock()
	m.decide(labels, err)
	if err != nil {
		if errors.Is(err, ErrNotStreamable) {
			m.fallbacks++
		}
		return err
	}
	m.mountsTotal++
	return nil
}

func (m *Manager) mount(ctx context.Context, mountpoint string, labels map[string]string) error {
	layer, err := digest.Parse(labels[LabelLayerDigest])
	if err != nil {
		return fmt.Errorf("%w: label %s: %v", ErrNotStreamable, LabelLayerDigest, err)
	}
	log := m.log.WithFields(logrus.Fields{"image": labels[LabelImageRef], "layer": layer})

	// A TOC fetched ahead for this image is used first; a layer mounted
	// before mounts again from its local record, without the registry:
	// restarts and reboots do not depend on it.
	var rec layerRecord
	var toc *artifact.TOC
	if w, ok := m.warm.take(layer); ok {
		if err := m.storeLayer(layer, w.rec, w.raw); err != nil {
			return err
		}
		rec, toc = w.rec, w.toc
	} else {
		rec, toc, err = m.localLayer(layer)
		if err != nil {
			log.WithError(err).Debug("no usable local record")
			rec, toc, err = m.remoteLayer(ctx, layer, labels, log)
			if err != nil {
				return err
			}
		}
	}
	if rec.Bad != "" {
		return fmt.Errorf("%w: layer %s failed verification against its diffID before (%s)", ErrNotStreamable, layer, rec.Bad)
	}
	if err := checkChain(labels, toc.DiffID); err != nil {
		log.WithError(err).WithField("op", "verify").Error("streaming artifact does not match the image; layer pulled normally")
		return fmt.Errorf("%w: layer %s: %v", ErrNotStreamable, layer, err)
	}
	st, err := m.acquire(layer, labels[LabelImageRef], rec, toc, log)
	if err != nil {
		return err
	}
	var reader ChunkReader = st.reader
	if image := labels[LabelImageRef]; m.opts.RecordWindow > 0 && image != "" {
		reader = newRecordingReader(st.reader, toc, image, &m.profiles, m.opts.RecordWindow)
	}
	mnt, err := Mount(mountpoint, toc, reader, Options{
		ReadTimeout: m.opts.ReadTimeout,
		Push:        m.opts.Prefetch && m.opts.PageCachePush,
		PushedBytes: &m.stats.pushedBytes,
		FUSEStats:   &m.stats.fuse,
		Logger:      log,
		FSName:      "streamer:" + layer.Encoded()[:12],
	})
	if err != nil {
		m.release(st)
		return fmt.Errorf("mount layer %s at %s: %w", layer, mountpoint, err)
	}
	m.mu.Lock()
	m.mounts[mountpoint] = &layerMount{layer: layer, toc: toc, fs: mnt, st: st}
	m.mu.Unlock()
	log.WithFields(logrus.Fields{"op": "mount", "files": len(toc.Entries), "chunks": len(toc.Chunks)}).Info("layer mounted")
	return nil
}

// checkChain binds a TOC to the image being unpacked: the chain id
// containerd asks for is derived from the image config's diffIDs, so the
// TOC's diffID must give that chain id on top of the parent's. Completion
// later checks the layer's bytes against the same diffID, so a TOC that
// matches its own forged chunks cannot pass for the image's layer. Without
// the labels (a caller that is not a snapshotter) there is nothing to bind to.
func checkChain(labels map[string]string, diffID digest.Digest) error {
	target, ok := labels[LabelSnapshotRef]
	parent, hasParent := labels[LabelParent]
	if !ok || !hasParent {
		return nil
	}
	want := diffID
	if parent != "" {
		if _, err := digest.Parse(parent); err != nil {
			return nil // not a chain id: a client naming snapshots its own way
		}
		want = digest.FromString(parent + " " + diffID.String())
	}
	if want.String() != target {
		return fmt.Errorf("TOC diffID %s gives chain id %s, the image's is %s: %w", diffID, want, target, artifact.ErrDigestMismatch)
	}
	return nil
}

// localLayer loads a layer's record and verified TOC from disk.
func (m *Manager) localLayer(layer digest.Digest) (layerRecord, *artifact.TOC, error) {
	var rec layerRecord
	b, err := os.ReadFile(recordPath(m.opts.Root, layer))
	if err != nil {
		return rec, nil, err
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, nil, fmt.Errorf("layer record %s: %w", layer, err)
	}
	tb, err := os.ReadFile(tocPath(m.opts.Root, rec.TOC.Digest))
	if err != nil {
		return rec, nil, err
	}
	if digest.FromBytes(tb) != rec.TOC.Digest {
		return rec, nil, fmt.Errorf("local TOC %s: %w", rec.TOC.Digest, artifact.ErrDigestMismatch)
	}
	toc, err := decodeLayerTOC(tb, layer)
	return rec, toc, err
}

// remoteLayer finds the layer in the image's streaming artifact, fetches
// its TOC and records both on disk.
func (m *Manager) remoteLayer(ctx context.Context, layer digest.Digest, labels map[string]string, log *logrus.Entry) (layerRecord, *artifact.TOC, error) {
	var rec layerRecord
	ref, err := fetcher.ParseRef(labels[LabelImageRef])
	if err != nil {
		return rec, nil, fmt.Errorf("%w: label %s: %v", ErrNotStreamable, LabelImageRef, err)
	}
	manifest, err := digest.Parse(labels[LabelManifestDigest])
	if err != nil {
		return rec, nil, fmt.Errorf("%w: label %s: %v", ErrNotStreamable, LabelManifestDigest, err)
	}
	art, err := m.findArtifact(ctx, ref, manifest, log)
	if err != nil {
		return rec, nil, err
	}
	l, ok := art.Layer(layer)
	if !ok {
		return rec, nil, fmt.Errorf("%w: artifact of %s has no layer %s", ErrNotStreamable, manifest, layer)
	}
	m.warmUp(ref, art, layer, log)
	if err := m.fetchTOCOnce(ctx, ref, l); err != nil {
		return rec, nil, err
	}
	w, ok := m.warm.take(layer)
	if !ok {
		// Another mount of the same layer took it meanwhile (rare): fetch
		// it again rather than depend on that mount's progress.
		rec, f, err := m.fetchTOC(ctx, ref, l)
		if err != nil {
			return rec, nil, err
		}
		w = warmTOC{rec: rec, fetchedTOC: f}
	}
	if err := m.storeLayer(layer, w.rec, w.raw); err != nil {
		return rec, nil, err
	}
	return w.rec, w.toc, nil
}

// warmUp fetches, in the background, the TOCs of the image's other layers
// that have no local record yet, so that their mounts do not wait for
// them: containerd prepares an image's layers one after another, and a
// TOC of tens of thousands of entries takes a round trip and some hundreds
// of milliseconds to decode and check. Once per image manifest.
func (m *Manager) warmUp(ref fetcher.Ref, art *artifact.Manifest, current digest.Digest, log *logrus.Entry) {
	if !m.warm.start(art.Subject.Digest) {
		return
	}
	var todo []artifact.Layer
	for _, l := range art.Layers {
		if l.Original == current {
			continue
		}
		if _, err := os.Stat(recordPath(m.opts.Root, l.Original)); err == nil {
			continue
		}
		todo = append(todo, l)
	}
	if len(todo) == 0 {
		return
	}
	sem := make(chan struct{}, warmConcurrency)
	for _, l := range todo {
		m.warmWG.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(m.warmCtx, warmTimeout)
			defer cancel()
			if err := m.fetchTOCOnce(ctx, ref, l); err != nil {
				// The layer's mount fetches it again and reports.
				log.WithError(err).WithFields(logrus.Fields{"op": "warm-toc", "layer": l.Original}).Debug("TOC not fetched ahead")
			}
		})
	}
}

// fetchTOCOnce fetches and checks a layer's TOC, once however many ask at
// the same time (its mount, the warm-up of its image), and leaves it in
// m.warm for the layer's mount to take.
func (m *Manager) fetchTOCOnce(ctx context.Context, ref fetcher.Ref, l artifact.Layer) error {
	_, err, _ := m.tocs.Do(l.Original.String(), func() (any, error) {
		rec, f, err := m.fetchTOC(ctx, ref, l)
		if err == nil {
			m.warm.put(l.Original, warmTOC{rec: rec, fetchedTOC: f})
		}
		return nil, err
	})
	return err
}

// fetchTOC fetches and checks a layer's TOC.
func (m *Manager) fetchTOC(ctx context.Context, ref fetcher.Ref, l artifact.Layer) (layerRecord, *fetchedTOC, error) {
	var rec layerRecord
	layer := l.Original
	rc, err := m.opts.Registry.FetchBlob(ctx, ref, ocispec.Descriptor{MediaType: l.TOC.MediaType, Digest: l.TOC.Digest, Size: l.TOC.Size})
	if err != nil {
		return rec, nil, fmt.Errorf("%w: fetch TOC %s of layer %s: %v", ErrNotStreamable, l.TOC.Digest, layer, err)
	}
	tb, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		return rec, nil, fmt.Errorf("%w: fetch TOC %s of layer %s: %v", ErrNotStreamable, l.TOC.Digest, layer, err)
	}
	toc, err := decodeLayerTOC(tb, layer)
	if err != nil {
		return rec, nil, fmt.Errorf("%w: %v", ErrNotStreamable, err)
	}
	// The TOC's chunk table must fit the blob the manifest names: a frame
	// past its end could never be read, only fail later.
	if toc.BlobSize != l.Blob.Size {
		return rec, nil, fmt.Errorf("%w: TOC %s of layer %s says the blob size is %d, the artifact manifest %d: %v", ErrNotStreamable, l.TOC.Digest, layer, toc.BlobSize, l.Blob.Size, artifact.ErrInvalidTOC)
	}
	return layerRecord{Ref: ref.Name(), Blob: l.Blob, TOC: l.TOC}, &fetchedTOC{toc: toc, raw: tb}, nil
}

// fetchedTOC is a layer's TOC fetched from the registry and checked, with
// its bytes, not yet recorded on disk.
type fetchedTOC struct {
	toc *artifact.TOC
	raw []byte
}

// storeLayer records a layer's TOC and record on disk, for mounts without
// the registry after a restart.
func (m *Manager) storeLayer(layer digest.Digest, rec layerRecord, raw []byte) error {
	if err := writeAtomic(tocPath(m.opts.Root, rec.TOC.Digest), raw); err != nil {
		return fmt.Errorf("store TOC of layer %s: %w", layer, err)
	}
	if err := m.writeRecord(layer, rec); err != nil {
		return fmt.Errorf("store record of layer %s: %w", layer, err)
	}
	return nil
}

func decodeLayerTOC(b []byte, layer digest.Digest) (*artifact.TOC, error) {
	toc, err := artifact.DecodeTOC(bytes.NewReader(b), artifact.Limits{})
	if err != nil {
		return nil, fmt.Errorf("decode TOC of layer %s: %w", layer, err)
	}
	if toc.Layer != layer {
		return nil, fmt.Errorf("TOC of layer %s names layer %s: %w", layer, toc.Layer, artifact.ErrInvalidTOC)
	}
	return toc, nil
}

// findArtifact looks up an image's streaming artifact once per manifest:
// found artifacts are remembered, "none" for NegativeTTL.
func (m *Manager) findArtifact(ctx context.Context, ref fetcher.Ref, manifest digest.Digest, log *logrus.Entry) (*artifact.Manifest, error) {
	m.mu.Lock()
	l, ok := m.artifacts[manifest]
	m.mu.Unlock()
	if ok && (l.err == nil || time.Since(l.at) < m.opts.NegativeTTL) {
		return l.m, l.err
	}
	v, _, _ := m.lookups.Do(manifest.String(), func() (any, error) {
		art, desc, err := m.opts.Registry.FindArtifact(ctx, ref, ocispec.Descriptor{Digest: manifest})
		l := lookup{m: art, desc: desc, at: time.Now()}
		if err != nil {
			l.err = fmt.Errorf("%w: find artifact of %s: %v", ErrNotStreamable, manifest, err)
			log.WithError(err).WithField("op", "lookup").Info("no streaming artifact; layers of this image are pulled normally")
		}
		m.mu.Lock()
		m.artifacts[manifest] = l
		m.mu.Unlock()
		return l, nil
	})
	l = v.(lookup)
	return l.m, l.err
}

// ImageDecision says whether an image's layers were streamed and why not.
type ImageDecision struct {
	Image          string    `json:"image"`
	Manifest       string    `json:"manifest,omitempty"`
	StreamedLayers int       `json:"streamedLayers"`
	PulledLayers   int       `json:"pulledLayers"` // left to a normal pull
	Reason         string    `json:"reason"`       // of the latest decision
	Updated        time.Time `json:"updated"`
}

// decide records the outcome of mounting a layer of an image; m.mu is held.
func (m *Manager) decide(labels map[string]string, err error) {
	image := labels[LabelImageRef]
	if image == "" {
		return
	}
	d, ok := m.decisions[image]
	if !ok {
		d = &ImageDecision{Image: image}
		m.decisions[image] = d
	}
	d.Manifest = labels[LabelManifestDigest]
	d.Updated = time.Now()
	if err != nil {
		d.PulledLayers++
		d.Reason = "pulled normally: " + err.Error()
		return
	}
	d.StreamedLayers++
	d.Reason = "streaming artifact found"
	if dg, perr := digest.Parse(labels[LabelManifestDigest]); perr == nil {
		if l, ok := m.artifacts[dg]; ok && l.desc.Digest != "" {
			d.Reason = "streaming artifact " + l.desc.Digest.String() + " found"
		}
	}
}

// Decisions returns, per image, whether its layers were streamed and why.
func (m *Manager) Decisions() []ImageDecision {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]ImageDecision, 0, len(m.decisions))
	for _, d := range m.decisions {
		out = append(out, *d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Image < out[j].Image })
	return out
}

// Check reports whether the layer mounted at mountpoint still answers.
func (m *Manager) Check(ctx context.Context, mountpoint string, labels map[string]string) error {
	m.mu.Lock()
	lm, ok := m.mounts[mountpoint]
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("check %s: not mounted by this daemon", mountpoint)
	}
	if _, err := os.Stat(mountpoint); err != nil {
		return fmt.Errorf("check layer %s at %s: %w", lm.layer, mountpoint, err)
	}
	return nil
}

// Unmount unmounts the layer at mountpoint. Its local record stays, so the
// layer mounts again without the registry.
func (m *Manager) Unmount(ctx context.Context, mountpoint string) error {
	m.mu.Lock()
	lm, ok := m.mounts[mountpoint]
	delete(m.mounts, mountpoint)
	m.mu.Unlock()
	if !ok {
		return nil
	}
	m.release(lm.st)
	if err := lm.fs.Unmount(); err != nil {
		return fmt.Errorf("unmount layer %s at %s: %w", lm.layer, mountpoint, err)
	}
	return nil
}

// acquire returns the state of a layer being mounted, creating it (and
// starting its background job) for its first mount.
func (m *Manager) acquire(layer digest.Digest, image string, rec layerRecord, toc *artifact.TOC, log *logrus.Entry) (*layerState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if st, ok := m.layers[layer]; ok {
		st.refs++
		return st, nil
	}
	ref, err := fetcher.ParseRef(rec.Ref)
	if err != nil {
		return nil, fmt.Errorf("mount layer %s: record ref: %w", layer, err)
	}
	st := &layerState{m: m, layer: layer, image: image, rec: rec, toc: toc, log: log, mounted: time.Now(), refs: 1}
	st.pool = m.sched.pool(ref.Host)
	st.reader = &remoteReader{
		src:         m.opts.Registry,
		ref:         ref,
		blob:        rec.Blob.Digest,
		cache:       m.opts.Cache,
		host:        st.pool,
		maxCoalesce: m.opts.MaxCoalesce,
		log:         log,
		stats:       &m.stats,
		layer:       &st.stats,
	}
	m.layers[layer] = st
	// A mounted layer's chunks stay on the node: eviction takes other
	// chunks first, and the disk rather than the cache bound is the limit.
	m.opts.Cache.Pin(chunkDigests(toc))
	if rec.Complete {
		// Known complete: nothing of it needs the registry, as long as
		// its chunks are still cached.
		if _, all := st.cachedBytes(); all {
			st.markComplete()
			return st, nil
		}
		log.Info("layer was complete but some chunks left the cache; fetching them again")
		st.rec.Complete = false
	}
	if !m.opts.Prefetch && !m.opts.Background {
		return st, nil
	}
	st.job = newLayerJob(st, m.opts.Prefetch, m.opts.Background, m.opts.MaxCoalesce, m.opts.PrefetchGap)
	if m.opts.Background && m.opts.Readahead > 0 {
		job, pool, n := st.job, st.pool, m.opts.Readahead
		st.reader.missed = func(c artifact.Chunk) { job.readAhead(pool, c, n) }
	}
	st.pool.add(st.job)
	return st, nil
}

// release drops one mount of a layer; the last one stops its background
// job and waits for it.
func (m *Manager) release(st *layerState) {
	m.mu.Lock()
	st.refs--
	last := st.refs == 0
	if last && m.layers[st.layer] == st {
		delete(m.layers, st.layer)
	}
	m.mu.Unlock()
	if last && st.job != nil {
		st.job.stop(st.pool)
	}
	if last {
		m.opts.Cache.Unpin(chunkDigests(st.toc))
	}
}

// chunkDigests lists the digests of a layer's chunks.
func chunkDigests(toc *artifact.TOC) []digest.Digest {
	ds := make([]digest.Digest, len(toc.Chunks))
	for i, c := range toc.Chunks {
		ds[i] = c.Digest
	}
	return ds
}

// Usage returns the bytes of the layer at mountpoint held on this node: its
// chunks in the cache (each counted once) and its TOC.
func (m *Manager) Usage(ctx context.Context, mountpoint string) (int64, int64, error) {
	m.mu.Lock()
	lm, ok := m.mounts[mountpoint]
	m.mu.Unlock()
	if !ok {
		return 0, 0, fmt.Errorf("usage of %s: not mounted by this daemon", mountpoint)
	}
	seen := make(map[digest.Digest]bool, len(lm.toc.Chunks))
	var size, inodes int64
	for _, c := range lm.toc.Chunks {
		if seen[c.Digest] {
			continue
		}
		seen[c.Digest] = true
		if m.opts.Cache.Has(c.Digest) {
			size += c.Size
		}
	}
	inodes = int64(len(lm.toc.Entries))
	return size, inodes, nil
}

// Forget garbage-collects a layer no longer used on this node: once its
// snapshot is removed and no mount of it remains, its chunks (those no
// mounted layer shares), its TOC and its record are deleted.
func (m *Manager) Forget(ctx context.Context, labels map[string]string) error {
	layer, err := digest.Parse(labels[LabelLayerDigest])
	if err != nil {
		return fmt.Errorf("forget layer: label %s: %w", LabelLayerDigest, err)
	}
	m.mu.Lock()
	_, mounted := m.layers[layer]
	m.mu.Unlock()
	if mounted {
		return nil
	}
	rec, toc, err := m.localLayer(layer)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var freed int64
	if err == nil {
		freed = m.opts.Cache.Remove(chunkDigests(toc))
	}
	paths := []string{recordPath(m.opts.Root, layer)}
	if rec.TOC.Digest != "" {
		paths = append(paths, tocPath(m.opts.Root, rec.TOC.Digest))
	}
	for _, p := range paths {
		if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fmt.Errorf("forget layer %s: %w", layer, rerr)
		}
	}
	m.log.WithFields(logrus.Fields{"layer": layer, "op": "gc", "freed": freed}).Info("removed layer garbage-collected from the node")
	return nil
}

// Close unmounts every layer this Manager mounted.
func (m *Manager) Close() error {
	m.mu.Lock()
	mps := make([]string, 0, len(m.mounts))
	for mp := range m.mounts {
		mps = append(mps, mp)
	}
	m.mu.Unlock()
	var errs []error
	for _, mp := range mps {
		errs = append(errs, m.Unmount(context.Background(), mp))
	}
	m.warmStop()
	m.warmWG.Wait()
	m.sched.close()
	return errors.Join(errs...)
}

// ManagerStats are counters for metrics.
type ManagerStats struct {
	Mounted       int   // layers mounted now
	MountsTotal   int64 // layers mounted since start
	Fallbacks     int64 // layers left to an ordinary pull
	FetchedBytes  int64 // compressed bytes read from registries
	FetchRequests int64
	BadChunks     int64 // chunks that failed verification
	// Fetched bytes by cause: read by the filesystem, prefetch lists,
	// background fetch of whole layers.
	OnDemandBytes, PrefetchBytes, BackgroundBytes int64
	// PushedBytes are bytes of listed files written into the kernel's
	// page cache (PageCachePush).
	PushedBytes int64
	// FUSEOps are the latencies of the FUSE requests the mounts served,
	// by operation (lookup, getattr, read...).
	FUSEOps map[string]Histogram
	// FetchLatency is the histogram of range request latencies.
	FetchLatency Histogram
	// LayersComplete are mounted layers all cached and verified;
	// LayersBad the layers that failed their diffID check since start.
	LayersComplete int
	LayersBad      int64
	// YieldedToPods is how long background work waited for the node's
	// pods to stop using the CPU, summed over the workers that waited.
	YieldedToPods time.Duration
}

// Stats returns the Manager's counters.
func (m *Manager) Stats() ManagerStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	complete := 0
	for _, st := range m.layers {
		if st.complete.Load() {
			complete++
		}
	}
	return ManagerStats{
		OnDemandBytes:   m.stats.byCause[causeOnDemand].Load(),
		PrefetchBytes:   m.stats.byCause[causePrefetch].Load(),
		BackgroundBytes: m.stats.byCause[causeBackground].Load(),
		PushedBytes:     m.stats.pushedBytes.Load(),
		FUSEOps:         m.stats.fuse.Snapshot(),
		FetchLatency:    m.stats.latency.snapshot(),
		LayersComplete:  complete,
		LayersBad:       m.stats.layersBad.Load(),
		YieldedToPods:   m.sched.pods.waitedFor(),
		Mounted:         len(m.mounts),
		MountsTotal:     m.mountsTotal,
		Fallbacks:       m.fallbacks,
		FetchedBytes:    m.stats.fetchedBytes.Load(),
		FetchRequests:   m.stats.fetchRequests.Load(),
		BadChunks:       m.stats.badChunks.Load(),
	}
}

// writeAtomic writes b to path through a temp file and a rename, so a
// crash never leaves a partial file that looks whole.
func writeAtomic(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

const (
	// warmConcurrency bounds the TOCs of one image fetched ahead at once.
	warmConcurrency = 3
	// warmTimeout bounds one TOC fetched ahead.
	warmTimeout = 2 * time.Minute
	// warmKeep is how long a TOC fetched ahead waits for its mount.
	warmKeep = 5 * time.Minute
)

// warmTOCs are TOCs fetched ahead of their layers' mounts, and the image
// manifests whose layers were fetched ahead.
type warmTOCs struct {
	mu     sync.Mutex
	layers map[digest.Digest]warmTOC
	images map[digest.Digest]time.Time
}

type warmTOC struct {
	rec layerRecord
	*fetchedTOC
	at time.Time
}

// start reports whether the image's warm-up is to start now (not within
// warmKeep of the last one).
func (w *warmTOCs) start(image digest.Digest) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	if w.images == nil {
		w.images = map[digest.Digest]time.Time{}
	}
	for k, at := range w.images {
		if now.Sub(at) > warmKeep {
			delete(w.images, k)
		}
	}
	if _, ok := w.images[image]; ok {
		return false
	}
	w.images[image] = now
	return true
}

func (w *warmTOCs) put(layer digest.Digest, t warmTOC) {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	if w.layers == nil {
		w.layers = map[digest.Digest]warmTOC{}
	}
	for k, t := range w.layers {
		if now.Sub(t.at) > warmKeep {
			delete(w.layers, k)
		}
	}
	t.at = now
	w.layers[layer] = t
}

// take returns and forgets the TOC fetched ahead for layer.
func (w *warmTOCs) take(layer digest.Digest) (warmTOC, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	t, ok := w.layers[layer]
	if !ok || time.Since(t.at) > warmKeep {
		return warmTOC{}, false
	}
	delete(w.layers, layer)
	return t, true
}
