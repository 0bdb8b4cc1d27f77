package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestBackgroundKeys(t *testing.T) {
	d := DefaultDaemon()
	if !d.Fetch.Background || !d.Fetch.Prefetch || d.Fetch.BackgroundConcurrency != 4 || d.Fetch.BackgroundRateLimit != 0 {
		t.Errorf("defaults: %+v; want background and prefetch on, 4 per host, unlimited", d.Fetch)
	}
	if c := d.Fetch.BackgroundYieldCgroups; len(c) != 2 || c[0] != "kubepods.slice" || c[1] != "kubepods" || d.Fetch.BackgroundYieldCPU != 0.25 || d.Fetch.BackgroundYieldWindow != Duration(time.Second) {
		t.Errorf("defaults: %+v; want background work to wait for kubelet's pods busy on a quarter of the CPUs, averaged over 1s", d.Fetch)
	}
	p := filepath.Join(t.TempDir(), "c.toml")
	os.WriteFile(p, []byte("[fetch]\nbackground = false\nprefetch = false\nbackground_concurrency = 2\nbackground_rate_limit = \"10MiB\"\n"+
		"background_yield_cgroups = [\"/sys/fs/cgroup/cpuacct/pods\"]\nbackground_yield_cpu = 0.5\nbackground_yield_window = \"300ms\"\n"), 0o644)
	got, err := LoadDaemon(p)
	if err != nil {
		t.Fatal(err)
	}
	if got.Fetch.Background || got.Fetch.Prefetch || got.Fetch.BackgroundConcurrency != 2 || got.Fetch.BackgroundRateLimit != 10*MiB ||
		len(got.Fetch.BackgroundYieldCgroups) != 1 || got.Fetch.BackgroundYieldCgroups[0] != "/sys/fs/cgroup/cpuacct/pods" ||
		got.Fetch.BackgroundYieldCPU != 0.5 || got.Fetch.BackgroundYieldWindow != Duration(300*time.Millisecond) {
		t.Errorf("loaded: %+v", got.Fetch)
	}
	tests := []struct {
		name   string
		mutate func(*Daemon)
		want   string
	}{
		{"zero background concurrency", func(d *Daemon) { d.Fetch.BackgroundConcurrency = 0 }, "fetch.background_concurrency:"},
		{"negative rate limit", func(d *Daemon) { d.Fetch.BackgroundRateLimit = -1 }, "fetch.background_rate_limit:"},
		{"yield share above 1", func(d *Daemon) { d.Fetch.BackgroundYieldCPU = 1.5 }, "fetch.background_yield_cpu:"},
		{"zero yield window", func(d *Daemon) { d.Fetch.BackgroundYieldWindow = 0 }, "fetch.background_yield_window:"},
		{"empty cgroup name", func(d *Daemon) { d.Fetch.BackgroundYieldCgroups = []string{""} }, "fetch.background_yield_cgroups:"},
		{"cgroup name out of the hierarchy", func(d *Daemon) { d.Fetch.BackgroundYieldCgroups = []string{"../x"} }, "fetch.background_yield_cgroups:"},
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
