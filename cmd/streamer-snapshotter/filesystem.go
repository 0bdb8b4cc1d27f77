package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
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
		Logger:      log.G(ctx),
	})
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	col := &collector{mgr: mgr, cache: store}
	if err := prometheus.Register(col); err != nil {
		log.G(ctx).WithError(err).Warn("metrics not registered")
	}
	closeFn := func() error {
		prometheus.Unregister(col)
		return errors.Join(mgr.Close(), store.Close())
	}
	return layers{mgr}, closeFn, nil
}

// layers adapts fs.Manager to the snapshotter's FileSystem: fs knows
// nothing of containerd, so kinds and types are translated here.
type layers struct{ m *fs.Manager }

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

func (l layers) Usage(ctx context.Context, mountpoint string) (snapshots.Usage, error) {
	size, inodes, err := l.m.Usage(ctx, mountpoint)
	return snapshots.Usage{Size: size, Inodes: inodes}, err
}

// collector exposes the manager's and cache's counters to Prometheus.
type collector struct {
	mgr   *fs.Manager
	cache *cache.Store
}

var (
	descMounted   = prometheus.NewDesc("streamer_layers_mounted", "Layers mounted now.", nil, nil)
	descMounts    = prometheus.NewDesc("streamer_layer_mounts_total", "Layers mounted since start.", nil, nil)
	descFallbacks = prometheus.NewDesc("streamer_layer_fallbacks_total", "Layers left to an ordinary pull (no streaming artifact or lookup failed).", nil, nil)
	descFetched   = prometheus.NewDesc("streamer_fetched_bytes_total", "Compressed bytes read from registries.", nil, nil)
	descRequests  = prometheus.NewDesc("streamer_fetch_requests_total", "Range requests made to registries.", nil, nil)
	descBad       = prometheus.NewDesc("streamer_bad_chunks_total", "Chunks that failed verification (never served, never cached).", nil, nil)
	descCache     = prometheus.NewDesc("streamer_cache_bytes", "Bytes of chunks in the disk cache.", nil, nil)
	descChunks    = prometheus.NewDesc("streamer_cache_chunks", "Chunks in the disk cache.", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descMounted, descMounts, descFallbacks, descFetched, descRequests, descBad, descCache, descChunks} {
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
	ch <- prometheus.MustNewConstMetric(descBad, prometheus.CounterValue, float64(s.BadChunks))
	ch <- prometheus.MustNewConstMetric(descCache, prometheus.GaugeValue, float64(c.cache.Size()))
	ch <- prometheus.MustNewConstMetric(descChunks, prometheus.GaugeValue, float64(c.cache.Len()))
}
