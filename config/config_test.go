package config

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func writeConfig(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaultsValidate(t *testing.T) {
	d := DefaultDaemon()
	if err := d.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
	if got, want := d.CacheDir(), "/var/lib/streamer-snapshotter/cache"; got != want {
		t.Errorf("CacheDir() = %q, want %q", got, want)
	}
}

func TestLoadOverrides(t *testing.T) {
	p := writeConfig(t, `
root = "/data/streamer"
log_format = "json"
negative_ttl = "5m"
[cache]
max_bytes = "2GiB"
memory_bytes = 1048576
[fetch]
concurrency = 16
timeout = "10s"
[registry]
insecure = ["localhost:5000"]
[registry.mirrors]
"docker.io" = ["mirror.local:5000", "mirror2.local"]
[registry.credentials."registry.example.com"]
username = "u"
password = "p"
`)
	got, err := LoadDaemon(p)
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultDaemon()
	want.Root = "/data/streamer"
	want.LogFormat = "json"
	want.NegativeTTL = Duration(5 * time.Minute)
	want.Cache.MaxBytes = 2 * GiB
	want.Cache.MemoryBytes = MiB
	want.Fetch.Concurrency = 16
	want.Fetch.Timeout = Duration(10 * time.Second)
	want.Registry.Insecure = []string{"localhost:5000"}
	want.Registry.Mirrors = map[string][]string{"docker.io": {"mirror.local:5000", "mirror2.local"}}
	want.Registry.Credentials = map[string]Credential{"registry.example.com": {Username: "u", Password: "p"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("LoadDaemon:\n got %+v\nwant %+v", got, want)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	if got.CacheDir() != "/data/streamer/cache" {
		t.Errorf("CacheDir() = %q, want it under the configured root", got.CacheDir())
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    []string
	}{
		{"unknown top-level key", "rooot = \"/x\"\n", []string{"unknown key rooot"}},
		{"unknown nested key", "[fetch]\nconcurency = 3\n", []string{"unknown key fetch.concurency"}},
		{"bad size", "[cache]\nmax_bytes = \"10 potatoes\"\n", []string{"max_bytes", "invalid size"}},
		{"bad duration", "[fetch]\ntimeout = \"soon\"\n", []string{"timeout", "invalid duration"}},
		{"wrong type", "[fetch]\nconcurrency = \"many\"\n", []string{"concurrency"}},
		{"not toml", "root = \n", []string{"config"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadDaemon(writeConfig(t, tt.content))
			if err == nil {
				t.Fatal("LoadDaemon: no error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		_, err := LoadDaemon(filepath.Join(t.TempDir(), "nope.toml"))
		if !errors.Is(err, os.ErrNotExist) {
			t.Errorf("got %v, want an error wrapping os.ErrNotExist", err)
		}
	})
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		modify func(*Daemon)
		key    string
	}{
		{"relative root", func(d *Daemon) { d.Root = "var/lib" }, "root:"},
		{"empty address", func(d *Daemon) { d.Address = "" }, "address:"},
		{"bad log level", func(d *Daemon) { d.LogLevel = "loud" }, "log_level:"},
		{"bad log format", func(d *Daemon) { d.LogFormat = "xml" }, "log_format:"},
		{"bad metrics address", func(d *Daemon) { d.MetricsAddress = "metrics" }, "metrics_address:"},
		{"bad metrics port", func(d *Daemon) { d.MetricsAddress = "127.0.0.1:99999" }, "metrics_address:"},
		{"negative ttl", func(d *Daemon) { d.NegativeTTL = -1 }, "negative_ttl:"},
		{"relative cache dir", func(d *Daemon) { d.Cache.Dir = "cache" }, "cache.dir:"},
		{"zero cache", func(d *Daemon) { d.Cache.MaxBytes = 0 }, "cache.max_bytes:"},
		{"negative memory", func(d *Daemon) { d.Cache.MemoryBytes = -1 }, "cache.memory_bytes:"},
		{"zero concurrency", func(d *Daemon) { d.Fetch.Concurrency = 0 }, "fetch.concurrency:"},
		{"zero coalesce", func(d *Daemon) { d.Fetch.MaxCoalesce = 0 }, "fetch.max_coalesce:"},
		{"nanosecond timeout", func(d *Daemon) { d.Fetch.Timeout = 30 }, "fetch.timeout:"},
		{"zero read timeout", func(d *Daemon) { d.Fetch.ReadTimeout = 0 }, "fetch.read_timeout:"},
		{"negative retries", func(d *Daemon) { d.Fetch.Retries = -1 }, "fetch.retries:"},
		{"insecure URL", func(d *Daemon) { d.Registry.Insecure = []string{"http://x/"} }, "registry.insecure:"},
		{"empty mirror", func(d *Daemon) { d.Registry.Mirrors = map[string][]string{"docker.io": {""}} }, "registry.mirrors.docker.io:"},
		{"relative CA", func(d *Daemon) { d.Registry.CAFiles = []string{"ca.pem"} }, "registry.ca_files:"},
		{"credential without user", func(d *Daemon) { d.Registry.Credentials = map[string]Credential{"h": {Password: "p"}} }, "registry.credentials.h.username:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := DefaultDaemon()
			tt.modify(&d)
			err := d.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.key) {
				t.Errorf("Validate: got %v, want an error naming %q", err, tt.key)
			}
		})
	}
	t.Run("all errors reported", func(t *testing.T) {
		d := DefaultDaemon()
		d.Root, d.LogFormat = "", "xml"
		err := d.Validate()
		if err == nil || !strings.Contains(err.Error(), "root:") || !strings.Contains(err.Error(), "log_format:") {
			t.Errorf("Validate: got %v, want both keys named", err)
		}
	})
}

func TestEncodeRoundTrip(t *testing.T) {
	custom := DefaultDaemon()
	custom.MetricsAddress = "127.0.0.1:9100"
	custom.Cache.MaxBytes = 3*GiB + 5 // not a whole unit
	custom.Registry.Mirrors = map[string][]string{"docker.io": {"m:5000"}}
	custom.Registry.Credentials = map[string]Credential{"r.example.com": {Username: "u", Password: "p"}}
	for name, d := range map[string]Daemon{"defaults": DefaultDaemon(), "custom": custom} {
		t.Run(name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := d.Encode(&buf); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(buf.String(), "# Bytes of chunks kept on disk") {
				t.Errorf("encoded config lacks key documentation:\n%s", buf.String())
			}
			got, err := LoadDaemon(writeConfig(t, buf.String()))
			if err != nil {
				t.Fatalf("load encoded config: %v\n%s", err, buf.String())
			}
			if !reflect.DeepEqual(normalize(got), normalize(d)) {
				t.Errorf("round trip:\n got %+v\nwant %+v", got, d)
			}
		})
	}
}

// normalize treats nil and empty lists and maps alike.
func normalize(d Daemon) Daemon {
	if len(d.Registry.Insecure) == 0 {
		d.Registry.Insecure = nil
	}
	if len(d.Registry.CAFiles) == 0 {
		d.Registry.CAFiles = nil
	}
	if len(d.Registry.Mirrors) == 0 {
		d.Registry.Mirrors = nil
	}
	if len(d.Registry.Credentials) == 0 {
		d.Registry.Credentials = nil
	}
	return d
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in      string
		want    Size
		wantErr bool
	}{
		{"0", 0, false},
		{"1048576", MiB, false},
		{"512B", 512, false},
		{"64KiB", 64 * KiB, false},
		{"4 MiB", 4 * MiB, false},
		{"10GiB", 10 * GiB, false},
		{"1TiB", TiB, false},
		{"10GB", 0, true},
		{"-1", 0, true},
		{"GiB", 0, true},
		{"99999999999TiB", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseSize(tt.in)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("ParseSize(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.wantErr)
			}
			if err == nil {
				back, err := ParseSize(got.String())
				if err != nil || back != got {
					t.Errorf("String %q does not parse back: %d, %v", got.String(), back, err)
				}
			}
		})
	}
}
