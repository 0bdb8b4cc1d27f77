package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/streamer-dev/streamer/cache"
	"github.com/streamer-dev/streamer/config"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/fs"
	"github.com/streamer-dev/streamer/snapshotter"
)

// newFileSystem wires the registry client, the chunk cache and the layer
// manager into the snapshotter's FileSystem, and registers their metrics.
func newFileSystem(ctx context.Context, cfg *config.Daemon) (snapshotter.FileSystem, func() error, error) {
	creds := map[string]fetcher.Credential{}
	for host, c := range cfg.Registry.Credentials {
		creds[host] = fetcher.Credential{Username: c.Username, Password: c.Password}
	}
	client, err := fetcher.New(fetcher.Options{
		Insecure:        cfg.Registry.Insecure,
		CAFiles:         cfg.Registry.CAFiles,
		DockerConfig:    cfg.Registry.DockerConfig,
		HostCredentials: creds,
		Mirrors:         cfg.Registry.Mirrors,
		Retries:         cfg.Fetch.Retries,
		Timeout:         time.Duration(cfg.Fetch.Timeout),
		UserAgent:       "streamer-snapshotter/" + version,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("registry client: %w", err)
	}
	store, err := cache.Open(cache.Options{
		Dir:         cfg.CacheDir(),
		MaxBytes:    int64(cfg.Cache.MaxBytes),
		MemoryBytes: int64(cfg.Cache.MemoryBytes),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("open chunk cache: %w", err)
	}
	mgr, err := fs.NewManager(fs.ManagerOptions{
		Root:        filepath.Join(cfg.Root, "layers"),
		Registry:    client,
		Cache:       store,
		Concurrency: cfg.Fetch.Concurrency,
		MaxCoalesce: int64(cfg.Fetch.MaxCoalesce),
		ReadTimeout: time.Duration(cfg.Fetch.ReadTimeout),
		NegativeTTL: time.Duration(cfg.NegativeTTL),

		Prefetch:              cfg.Fetch.Prefetch,
		PrefetchGap:           int64(cfg.Fetch.PrefetchGap),
		PageCachePush:         cfg.Fetch.PageCachePush,
		Readahead:             int64(cfg.Fetch.Readahead),
		Background:            cfg.Fetch.Background,
		BackgroundConcurrency: cfg.Fetch.BackgroundConcurrency,
		BackgroundRateLimit:   int64(cfg.Fetch.BackgroundRateLimit),
		YieldCgroups:          cfg.Fetch.BackgroundYieldCgroups,
		YieldCPU:              cfg.Fetch.BackgroundYieldCPU,
		YieldWindow:           time.Duration(cfg.Fetch.BackgroundYieldWindow),
		RecordWindow:          time.Duration(cfg.Fetch.RecordWindow),
		Logger:                log.G(ctx),
	})
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	col := &collector{mgr: mgr, cache: store, client: client}
	if err := prometheus.Register(col); err != nil {
		log.G(ctx).WithError(err).Warn("metrics not registered")
	}
	statusHandler.mgr.Store(mgr)
	closeFn := func() error {
		prometheus.Unregister(col)
		statusHandler.mgr.Store(nil)
		return errors.Join(mgr.Close(), store.Close())
	}
	return layers{mgr}, closeFn, nil
}

// layers adapts fs.Manager to the snapshotter's FileSystem: fs knows
// nothing of containerd, so kinds and types are translated here.
type layers struct{ m *fs.Manager }

var _ snapshotter.Forgetter = layers{}

func (l layers) Mount(ctx context.Context, mountpoint string, labels map[string]string) error {
	err := l.m.Mount(ctx, mountpoint, labels)
	if errors.Is(err, fs.ErrNotStreamable) {
		return fmt.Errorf("%w: %w", snapshotter.ErrNotStreamable, err)
	}
	return err
}

func (l layers) Check(ctx context.Context, mountpoint string, labels map[string]string) error {
	return l.m.Check(ctx, mountpoint, labels)
}

func (l layers) Unmount(ctx context.Context, mountpoint string) error {
	return l.m.Unmount(ctx, mountpoint)
}

func (l layers) Forget(ctx context.Context, labels map[string]string) error {
	return l.m.Forget(ctx, labels)
}

func (l layers) Usage(ctx context.Context, mountpoint string) (snapshots.Usage, error) {
	size, inodes, err := l.m.Usage(ctx, mountpoint)
	return snapshots.Usage{Size: size, Inodes: inodes}, err
}

// collector exposes the manager's and cache's counters to Prometheus.
type collector struct {
	mgr    *fs.Manager
	cache  *cache.Store
	client *fetcher.Client
}

var (
	descMounted   = prometheus.NewDesc("streamer_layers_mounted", "Layers mounted now.", nil, nil)
	descMounts    = prometheus.NewDesc("streamer_layer_mounts_total", "Layers mounted since start.", nil, nil)
	descFallbacks = prometheus.NewDesc("streamer_layer_fallbacks_total", "Layers left to an ordinary pull (no streaming artifact or lookup failed).", nil, nil)
	descFetched   = prometheus.NewDesc("streamer_fetched_bytes_total", "Compressed bytes read from registries.", nil, nil)
	descRequests  = prometheus.NewDesc("streamer_fetch_requests_total", "Range requests made to registries.", nil, nil)
	descRedirects = prometheus.NewDesc("streamer_fetch_redirects_total", "Range reads a registry redirected to blob storage; the blob's later reads go to that location directly for a while.", nil, nil)
	descBad       = prometheus.NewDesc("streamer_bad_chunks_total", "Chunks that failed verification (never served, never cached).", nil, nil)
	descCache     = prometheus.NewDesc("streamer_cache_bytes", "Bytes of chunks in the disk cache.", nil, nil)
	descChunks    = prometheus.NewDesc("streamer_cache_chunks", "Chunks in the disk cache.", nil, nil)

	descFetchedBy = prometheus.NewDesc("streamer_fetched_bytes_by_cause_total", "Compressed bytes read from registries, by cause: on_demand (file reads), prefetch (prefetch lists), background (whole layers).", []string{"cause"}, nil)
	descLatency   = prometheus.NewDesc("streamer_fetch_request_duration_seconds", "Latency of range requests to registries.", nil, nil)
	descHits      = prometheus.NewDesc("streamer_cache_hits_total", "Chunk cache lookups answered, by tier.", []string{"tier"}, nil)
	descMisses    = prometheus.NewDesc("streamer_cache_misses_total", "Chunk cache lookups that found nothing usable.", nil, nil)
	descEvictions = prometheus.NewDesc("streamer_cache_evictions_total", "Chunks evicted from the disk cache.", nil, nil)
	descLayersOK  = prometheus.NewDesc("streamer_layers_complete", "Mounted layers whose every chunk is cached and whose tar matched its diffID.", nil, nil)
	descPushed    = prometheus.NewDesc("streamer_page_cache_pushed_bytes_total", "Bytes of prefetch-listed files written into the kernel's page cache when first opened (fetch.page_cache_push).", nil, nil)
	descFUSE      = prometheus.NewDesc("streamer_fuse_operation_duration_seconds", "Latency of FUSE requests served by the layer mounts, from the read of the request to the write of its answer, by operation (lookup, getattr, open, read, readdirplus...).", []string{"op"}, nil)
	descLayersBad = prometheus.NewDesc("streamer_layer_verification_failures_total", "Layers whose tar rebuilt from verified chunks did not match their diffID.", nil, nil)
	descYielded   = prometheus.NewDesc("streamer_background_yield_to_pods_seconds_total", "Time background workers waited for the node's pods to stop using the CPU (fetch.background_yield_cpu), summed over workers.", nil, nil)
)

var allDescs = []*prometheus.Desc{
	descMounted, descMounts, descFallbacks, descFetched, descRequests, descRedirects, descBad, descCache, descChunks,
	descFetchedBy, descLatency, descHits, descMisses, descEvictions, descLayersOK, descLayersBad, descPushed,
	descFUSE, descYielded,
}

// constHistogram is h as a Prometheus histogram (cumulative buckets).
func constHistogram(d *prometheus.Desc, h fs.Histogram, labels ...string) prometheus.Metric {
	buckets := make(map[float64]uint64, len(h.Bounds))
	var cum uint64
	for i, b := range h.Bounds {
		cum += h.Counts[i]
		buckets[b] = cum
	}
	return prometheus.MustNewConstHistogram(d, h.Count(), h.Sum, buckets, labels...)
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.mgr.Stats()
	ch <- prometheus.MustNewConstMetric(descMounted, prometheus.GaugeValue, float64(s.Mounted))
	ch <- prometheus.MustNewConstMetric(descMounts, prometheus.CounterValue, float64(s.MountsTotal))
	ch <- prometheus.MustNewConstMetric(descFallbacks, prometheus.CounterValue, float64(s.Fallbacks))
	ch <- prometheus.MustNewConstMetric(descFetched, prometheus.CounterValue, float64(s.FetchedBytes))
	ch <- prometheus.MustNewConstMetric(descRequests, prometheus.CounterValue, float64(s.FetchRequests))
	ch <- prometheus.MustNewConstMetric(descRedirects, prometheus.CounterValue, float64(c.client.Redirects()))
	ch <- prometheus.MustNewConstMetric(descBad, prometheus.CounterValue, float64(s.BadChunks))
	ch <- prometheus.MustNewConstMetric(descCache, prometheus.GaugeValue, float64(c.cache.Size()))
	ch <- prometheus.MustNewConstMetric(descChunks, prometheus.GaugeValue, float64(c.cache.Len()))

	ch <- prometheus.MustNewConstMetric(descFetchedBy, prometheus.CounterValue, float64(s.OnDemandBytes), "on_demand")
	ch <- prometheus.MustNewConstMetric(descFetchedBy, prometheus.CounterValue, float64(s.PrefetchBytes), "prefetch")
	ch <- prometheus.MustNewConstMetric(descFetchedBy, prometheus.CounterValue, float64(s.BackgroundBytes), "background")
	ch <- constHistogram(descLatency, s.FetchLatency)
	for op, h := range s.FUSEOps {
		ch <- constHistogram(descFUSE, h, op)
	}
	cs := c.cache.Stats()
	ch <- prometheus.MustNewConstMetric(descHits, prometheus.CounterValue, float64(cs.MemoryHits), "memory")
	ch <- prometheus.MustNewConstMetric(descHits, prometheus.CounterValue, float64(cs.DiskHits), "disk")
	ch <- prometheus.MustNewConstMetric(descMisses, prometheus.CounterValue, float64(cs.Misses))
	ch <- prometheus.MustNewConstMetric(descEvictions, prometheus.CounterValue, float64(cs.Evictions))
	ch <- prometheus.MustNewConstMetric(descLayersOK, prometheus.GaugeValue, float64(s.LayersComplete))
	ch <- prometheus.MustNewConstMetric(descLayersBad, prometheus.CounterValue, float64(s.LayersBad))
	ch <- prometheus.MustNewConstMetric(descPushed, prometheus.CounterValue, float64(s.PushedBytes))
	ch <- prometheus.MustNewConstMetric(descYielded, prometheus.CounterValue, s.YieldedToPods.Seconds())
}

// StatusResponse is the body of GET /status.
type StatusResponse struct {
	Layers []fs.LayerStatus `json:"layers"`
	// Images says, per image seen, whether its layers were streamed and
	// why not.
	Images []fs.ImageDecision `json:"images"`
}

// statusEndpoint serves GET /status: the state of every mounted layer, as
// JSON. serveMetrics mounts it next to /metrics.
type statusEndpoint struct {
	mgr atomic.Pointer[fs.Manager]
}

// statusHandler is the daemon's status endpoint; newFileSystem points it at
// the manager.
var statusHandler = &statusEndpoint{}

func (e *statusEndpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	mgr := e.mgr.Load()
	if mgr == nil {
		http.Error(w, "layer manager not running", http.StatusServiceUnavailable)
		return
	}
	resp := StatusResponse{Layers: mgr.Status(), Images: mgr.Decisions()}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(resp); err != nil {
		log.L.WithError(err).Debug("write status")
	}
}
