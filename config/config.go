// Package config holds the node daemon's configuration: a TOML file whose
// keys override the defaults of DefaultDaemon, then are validated.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// Daemon is the configuration of streamer-snapshotter. Each key's
// documentation is its comment tag, printed by Encode.
type Daemon struct {
	Root           string   `toml:"root" comment:"Directory holding snapshots, their metadata and (by default) the chunk cache."`
	Address        string   `toml:"address" comment:"Unix socket serving containerd's snapshots API (proxy_plugins address)."`
	LogLevel       string   `toml:"log_level" comment:"Log level: trace, debug, info, warn, error."`
	LogFormat      string   `toml:"log_format" comment:"Log format: text or json."`
	MetricsAddress string   `toml:"metrics_address" comment:"Where /metrics and /healthz are served: a unix socket path or host:port (e.g. 127.0.0.1:9100); empty disables them."`
	LookupCacheTTL Duration `toml:"lookup_cache_ttl" comment:"How long a found streaming artifact of an image is remembered."`
	NegativeTTL    Duration `toml:"negative_ttl" comment:"How long an image without streaming artifact is remembered as such (it is pulled normally meanwhile)."`
	Cache          Cache    `toml:"cache" comment:"Chunk cache."`
	Fetch          Fetch    `toml:"fetch" comment:"Fetching chunks from registries."`
	Registry       Registry `toml:"registry" comment:"Registry access."`
}

// Cache configures the chunk cache.
type Cache struct {
	Dir         string `toml:"dir" comment:"Cache directory; empty means <root>/cache."`
	MaxBytes    Size   `toml:"max_bytes" comment:"Bytes of chunks kept on disk before the least recently used are evicted. A size: an integer of bytes or a string such as \"10GiB\" (units B, KiB, MiB, GiB, TiB)."`
	MemoryBytes Size   `toml:"memory_bytes" comment:"Bytes of recently read chunks kept in memory; 0 disables the memory cache."`
}

// Fetch configures how chunks are fetched.
type Fetch struct {
	Concurrency   int      `toml:"concurrency" comment:"Concurrent range requests per registry host."`
	MaxCoalesce   Size     `toml:"max_coalesce" comment:"Largest range request made by merging adjacent chunks."`
	Timeout       Duration `toml:"timeout" comment:"Time limit of one HTTP request, as a Go duration (\"30s\", \"1m\")."`
	ReadTimeout   Duration `toml:"read_timeout" comment:"Time limit of one read through the filesystem, retries included; past it the read fails with EIO."`
	Retries       int      `toml:"retries" comment:"Retries of a failed request (network error, 5xx, 429)."`
	Prefetch      bool     `toml:"prefetch" comment:"Fetch the files of a layer's prefetch list (read at startup) first, as soon as it mounts."`
	Readahead     Size     `toml:"readahead" comment:"With background fetch on, each on-demand fetch also starts the fetch of up to this many bytes of the chunks after it, ahead of other background work (files next to each other in a layer are read together); 0 turns it off."`
	PageCachePush bool     `toml:"page_cache_push" comment:"With prefetch on, when a process first opens a listed file of at least 1 MiB, write the whole file into the kernel's page cache, so that its page faults (the code of shared libraries) are served by the kernel instead of each going through the filesystem."`
	PrefetchGap   Size     `toml:"prefetch_gap" comment:"Prefetch merges the chunks of listed files into requests of up to max_coalesce, bridging up to this many bytes of unlisted chunks between them (one round trip costs about the link's rate times its delay in bytes); background requests bridge chunks already cached up to 64 KiB or this, if smaller; 0 merges only adjacent chunks."`
	// Background, BackgroundConcurrency and BackgroundRateLimit shape the
	// fetch of whole layers after mount, so that the node stops needing
	// the registry; on-demand reads always go first.
	Background            bool `toml:"background" comment:"After mount, fetch the rest of every layer in the background until it is complete and verified against its diffID."`
	BackgroundConcurrency int  `toml:"background_concurrency" comment:"Concurrent background range requests per registry host (on-demand reads have their own fetch.concurrency)."`
	BackgroundRateLimit   Size `toml:"background_rate_limit" comment:"Bytes per second all background fetches together may read; 0 means unlimited."`
	// BackgroundYield* make background work give way to the node's pods.
	BackgroundYieldCgroups []string `toml:"background_yield_cgroups" comment:"The cgroup of the node's pods, the first found of these names (under the cgroup v1 cpuacct hierarchy or the unified one; absolute paths also work): background fetch waits while it uses more than background_yield_cpu of the node's CPUs, so that containers serve their first requests at full speed (busy pods slow it down, never stop it). Empty turns it off."`
	BackgroundYieldCPU     float64  `toml:"background_yield_cpu" comment:"Share of the node's CPUs (0 to 1) the pods may use, in the last 10ms or on average, before background fetch waits for them; 0 turns it off."`
	BackgroundYieldWindow  Duration `toml:"background_yield_window" comment:"Time constant of the pods' average CPU use: background fetch also waits while that average is over background_yield_cpu, so it stays back for a moment after a busy startup (the first requests come then) but not after a short burst."`
	// RecordWindow is how long after a layer mounts its first reads are
	// recorded into the image's startup profile (GET /profile).
	RecordWindow Duration `toml:"record_window" comment:"How long after a layer mounts the files read from it are recorded, per image in first-read order, for GET /profile (streamer profile); 0 records nothing."`
}

// Registry configures registry access.
type Registry struct {
	Insecure     []string              `toml:"insecure" comment:"Hosts (host or host:port) reached over plain HTTP or with unverified TLS."`
	Mirrors      map[string][]string   `toml:"mirrors" comment:"Mirrors tried in order before a host, e.g. \"registry.example.com\" = [\"mirror.local:5000\"]."`
	CAFiles      []string              `toml:"ca_files" comment:"PEM files of extra certificate authorities trusted for registries."`
	DockerConfig string                `toml:"docker_config" comment:"Docker config.json to read credentials from; empty: none."`
	Credentials  map[string]Credential `toml:"credentials" comment:"Credentials per host, e.g. [registry.credentials.\"registry.example.com\"] username = \"u\" password = \"p\"."`
}

// Credential is a username and password (or token) for a registry host.
type Credential struct {
	Username string `toml:"username"`
	Password string `toml:"password"`
}

// DefaultDaemon returns the defaults every key of the file overrides.
func DefaultDaemon() Daemon {
	return Daemon{
		Root:           "/var/lib/streamer-snapshotter",
		Address:        "/run/streamer-snapshotter/streamer.sock",
		LogLevel:       "info",
		LogFormat:      "text",
		MetricsAddress: "",
		LookupCacheTTL: Duration(30 * time.Second),
		NegativeTTL:    Duration(30 * time.Second),
		Cache: Cache{
			Dir:         "",
			MaxBytes:    10 * GiB,
			MemoryBytes: 64 * MiB,
		},
		Fetch: Fetch{
			Concurrency:   8,
			MaxCoalesce:   4 * MiB,
			Timeout:       Duration(30 * time.Second),
			ReadTimeout:   Duration(60 * time.Second),
			Retries:       3,
			Prefetch:      true,
			PageCachePush: true,
			PrefetchGap:   1 * MiB,
			Readahead:     2 * MiB,

			Background:             true,
			BackgroundConcurrency:  4,
			BackgroundRateLimit:    0,
			BackgroundYieldCgroups: []string{"kubepods.slice", "kubepods"},
			BackgroundYieldCPU:     0.25,
			BackgroundYieldWindow:  Duration(time.Second),
			RecordWindow:           Duration(2 * time.Minute),
		},
	}
}

// CacheDir is the cache directory in effect: Cache.Dir, or <root>/cache.
func (d Daemon) CacheDir() string {
	if d.Cache.Dir != "" {
		return d.Cache.Dir
	}
	return filepath.Join(d.Root, "cache")
}

// LoadDaemon reads the TOML file at path over the defaults. Unknown keys are
// an error. It does not validate: flags may still override keys, so call
// Validate last.
func LoadDaemon(path string) (Daemon, error) {
	d := DefaultDaemon()
	b, err := os.ReadFile(path)
	if err != nil {
		return d, fmt.Errorf("read config: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(b)).DisallowUnknownFields()
	if err := dec.Decode(&d); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			keys := make([]string, len(strict.Errors))
			for i, e := range strict.Errors {
				keys[i] = strings.Join(e.Key(), ".")
			}
			return d, fmt.Errorf("config %s: unknown key %s", path, strings.Join(keys, ", "))
		}
		var derr *toml.DecodeError
		if errors.As(err, &derr) {
			row, col := derr.Position()
			key := strings.Join(derr.Key(), ".")
			return d, fmt.Errorf("config %s:%d:%d: key %s: %w", path, row, col, key, err)
		}
		return d, fmt.Errorf("config %s: %w", path, err)
	}
	return d, nil
}

var logLevels = []string{"trace", "debug", "info", "warn", "warning", "error", "fatal", "panic"}

// Validate reports every invalid key, each error naming its key.
func (d Daemon) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	absPath := func(key, p string, required bool) {
		switch {
		case p == "" && required:
			bad(key, "must be set")
		case p != "" && !filepath.IsAbs(p):
			bad(key, "must be an absolute path, got %q", p)
		}
	}
	absPath("root", d.Root, true)
	absPath("address", d.Address, true)
	if !contains(logLevels, d.LogLevel) {
		bad("log_level", "must be one of %s, got %q", strings.Join(logLevels, ", "), d.LogLevel)
	}
	if d.LogFormat != "text" && d.LogFormat != "json" {
		bad("log_format", "must be text or json, got %q", d.LogFormat)
	}
	if a := d.MetricsAddress; a != "" && !filepath.IsAbs(a) {
		if _, port, err := net.SplitHostPort(a); err != nil {
			bad("metrics_address", "must be a unix socket path or host:port, got %q", a)
		} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
			bad("metrics_address", "bad port in %q", a)
		}
	}
	if d.LookupCacheTTL < 0 {
		bad("lookup_cache_ttl", "must not be negative, got %s", d.LookupCacheTTL)
	}
	if d.NegativeTTL < 0 {
		bad("negative_ttl", "must not be negative, got %s", d.NegativeTTL)
	}
	absPath("cache.dir", d.Cache.Dir, false)
	if d.Cache.MaxBytes <= 0 {
		bad("cache.max_bytes", "must be positive, got %d", d.Cache.MaxBytes)
	}
	if d.Cache.MemoryBytes < 0 {
		bad("cache.memory_bytes", "must not be negative, got %d", d.Cache.MemoryBytes)
	}
	if d.Fetch.Concurrency < 1 {
		bad("fetch.concurrency", "must be at least 1, got %d", d.Fetch.Concurrency)
	}
	if d.Fetch.MaxCoalesce <= 0 {
		bad("fetch.max_coalesce", "must be positive, got %d", d.Fetch.MaxCoalesce)
	}
	// Durations below a millisecond are almost surely an integer read as
	// nanoseconds: durations are strings such as "30s".
	if d.Fetch.Timeout < Duration(time.Millisecond) {
		bad("fetch.timeout", "must be at least 1ms (write a string such as \"30s\"), got %s", d.Fetch.Timeout)
	}
	if d.Fetch.ReadTimeout < Duration(time.Millisecond) {
		bad("fetch.read_timeout", "must be at least 1ms (write a string such as \"60s\"), got %s", d.Fetch.ReadTimeout)
	}
	if d.Fetch.Retries < 0 {
		bad("fetch.retries", "must not be negative, got %d", d.Fetch.Retries)
	}
	if d.Fetch.Readahead < 0 {
		bad("fetch.readahead", "must not be negative, got %d", d.Fetch.Readahead)
	}
	if d.Fetch.PrefetchGap < 0 {
		bad("fetch.prefetch_gap", "must not be negative, got %d", d.Fetch.PrefetchGap)
	}
	if d.Fetch.BackgroundConcurrency < 1 {
		bad("fetch.background_concurrency", "must be at least 1, got %d", d.Fetch.BackgroundConcurrency)
	}
	if d.Fetch.RecordWindow < 0 {
		bad("fetch.record_window", "must not be negative (0 records nothing), got %s", d.Fetch.RecordWindow)
	}
	if d.Fetch.BackgroundYieldCPU < 0 || d.Fetch.BackgroundYieldCPU > 1 {
		bad("fetch.background_yield_cpu", "must be between 0 (off) and 1, got %g", d.Fetch.BackgroundYieldCPU)
	}
	if d.Fetch.BackgroundYieldWindow < Duration(time.Millisecond) {
		bad("fetch.background_yield_window", "must be at least 1ms (write a string such as \"1s\"), got %s", d.Fetch.BackgroundYieldWindow)
	}
	for _, c := range d.Fetch.BackgroundYieldCgroups {
		if c == "" || !filepath.IsAbs(c) && strings.Contains(c, "..") {
			bad("fetch.background_yield_cgroups", "must list cgroup names or absolute paths, got %q", c)
		}
	}
	if d.Fetch.BackgroundRateLimit < 0 {
		bad("fetch.background_rate_limit", "must not be negative (0 is unlimited), got %d", d.Fetch.BackgroundRateLimit)
	}
	for _, h := range d.Registry.Insecure {
		if h == "" || strings.Contains(h, "/") {
			bad("registry.insecure", "must list hosts (host or host:port), got %q", h)
		}
	}
	for host, mirrors := range d.Registry.Mirrors {
		if host == "" {
			bad("registry.mirrors", "host must not be empty")
		}
		for _, m := range mirrors {
			if m == "" {
				bad("registry.mirrors."+host, "mirror must not be empty")
			}
		}
	}
	for _, f := range d.Registry.CAFiles {
		absPath("registry.ca_files", f, true)
	}
	absPath("registry.docker_config", d.Registry.DockerConfig, false)
	for host, c := range d.Registry.Credentials {
		if c.Username == "" {
			bad("registry.credentials."+host+".username", "must be set")
		}
	}
	return errors.Join(errs...)
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// Encode writes d as commented TOML that LoadDaemon reads back.
func (d Daemon) Encode(w io.Writer) error {
	if _, err := io.WriteString(w, "# streamer-snapshotter configuration. Every key is optional: a key left out\n# keeps the default shown here.\n\n"); err != nil {
		return fmt.Errorf("encode config: %w", err)
	}
	enc := toml.NewEncoder(w).SetIndentTables(true)
	if err := enc.Encode(d); err != nil {
		return fmt.Errorf("encode config: %w", err)
	}
	// Empty maps encode to nothing: show their shape.
	var examples []string
	if len(d.Registry.Mirrors) == 0 {
		examples = append(examples,
			"# Mirrors, tried in order before the host itself:",
			"# [registry.mirrors]",
			"#   \"registry.example.com\" = [\"mirror.local:5000\"]")
	}
	if len(d.Registry.Credentials) == 0 {
		examples = append(examples,
			"# Credentials per host:",
			"# [registry.credentials.\"registry.example.com\"]",
			"#   username = \"user\"",
			"#   password = \"secret\"")
	}
	if len(examples) > 0 {
		if _, err := io.WriteString(w, "\n"+strings.Join(examples, "\n")+"\n"); err != nil {
			return fmt.Errorf("encode config: %w", err)
		}
	}
	return nil
}
