package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestBackgroundKeys(t *testing.T) {
	d := DefaultDaemon()
	if !d.Fetch.Background || !d.Fetch.Prefetch || d.Fetch.BackgroundConcurrency != 4 || d.Fetch.BackgroundRateLimit != 0 {
		t.Errorf("defaults: %+v; want background and prefetch on, 4 per host, unlimited", d.Fetch)
	}
	p := filepath.Join(t.TempDir(), "c.toml")
	os.WriteFile(p, []byte("[fetch]\nbackground = false\nprefetch = false\nbackground_concurrency = 2\nbackground_rate_limit = \"10MiB\"\n"), 0o644)
	got, err := LoadDaemon(p)
	if err != nil {
		t.Fatal(err)
	}
	if got.Fetch.Background || got.Fetch.Prefetch || got.Fetch.BackgroundConcurrency != 2 || got.Fetch.BackgroundRateLimit != 10*MiB {
		t.Errorf("loaded: %+v", got.Fetch)
	}
	tests := []struct {
		name   string
		mutate func(*Daemon)
		want   string
	}{
		{"zero background concurrency", func(d *Daemon) { d.Fetch.BackgroundConcurrency = 0 }, "fetch.background_concurrency:"},
		{"negative rate limit", func(d *Daemon) { d.Fetch.BackgroundRateLimit = -1 }, "fetch.background_rate_limit:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := DefaultDaemon()
			tt.mutate(&d)
			if err := d.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Validate() = %v; want an error naming %s", err, tt.want)
			}
		})
	}
}
