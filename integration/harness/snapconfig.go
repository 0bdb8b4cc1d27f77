package harness

import (
	"fmt"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// SnapshotterConfig is the part of streamer-snapshotter's TOML config
// (package config) the tests set.
type SnapshotterConfig struct {
	// Insecure hosts are reached over plain HTTP.
	Insecure []string
	// Mirrors maps a registry host to hosts tried first (a counting proxy).
	Mirrors map[string][]string
	// RequestTimeout bounds one HTTP request; ReadTimeout one FUSE read.
	RequestTimeout, ReadTimeout time.Duration
	// Retries of a failed request.
	Retries int
	// CacheDir overrides <root>/cache.
	CacheDir string
	// Background sets fetch.background when not nil (the daemon's default
	// is on).
	Background *bool
	// MetricsAddress sets metrics_address (where /metrics and /status are
	// served) when not empty.
	MetricsAddress string
}

// TOML renders the config file.
func (c SnapshotterConfig) TOML() (string, error) {
	doc := map[string]any{}
	fetch := map[string]any{}
	if c.RequestTimeout > 0 {
		fetch["timeout"] = c.RequestTimeout.String()
	}
	if c.ReadTimeout > 0 {
		fetch["read_timeout"] = c.ReadTimeout.String()
	}
	fetch["retries"] = c.Retries
	if c.Background != nil {
		fetch["background"] = *c.Background
	}
	doc["fetch"] = fetch
	reg := map[string]any{}
	if len(c.Insecure) > 0 {
		reg["insecure"] = c.Insecure
	}
	if len(c.Mirrors) > 0 {
		reg["mirrors"] = c.Mirrors
	}
	doc["registry"] = reg
	if c.MetricsAddress != "" {
		doc["metrics_address"] = c.MetricsAddress
	}
	if c.CacheDir != "" {
		doc["cache"] = map[string]any{"dir": c.CacheDir}
	}
	b, err := toml.Marshal(doc)
	if err != nil {
		return "", fmt.Errorf("encode snapshotter config: %w", err)
	}
	return string(b), nil
}
