package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/pelletier/go-toml/v2"
	"github.com/streamer-dev/streamer/config"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// binary is the daemon built once for all tests.
var binary string

func TestMain(m *testing.M) {
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "streamer-snapshotter-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	binary = filepath.Join(dir, "streamer-snapshotter")
	build := exec.Command(gobin, "build", "-o", binary, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build streamer-snapshotter:", err)
		return 1
	}
	return m.Run()
}

// daemon is a running streamer-snapshotter.
type daemon struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	exited chan struct{}
	err    error // of Wait, once exited is closed
}

func start(t *testing.T, args ...string) *daemon {
	t.Helper()
	d := &daemon{cmd: exec.Command(binary, args...), stderr: &bytes.Buffer{}, exited: make(chan struct{})}
	d.cmd.Stderr = d.stderr
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.err = d.cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			d.cmd.Process.Kill()
			<-d.exited
		}
	})
	return d
}

// wait waits for the daemon to exit and returns its exit code.
func (d *daemon) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-d.exited:
	case <-time.After(timeout):
		t.Fatalf("daemon still running after %s; stderr:\n%s", timeout, d.stderr)
	}
	var exit *exec.ExitError
	if errors.As(d.err, &exit) {
		return exit.ExitCode()
	}
	if d.err != nil {
		t.Fatal(d.err)
	}
	return 0
}

// writeConfig writes a config for a daemon living in a fresh directory.
func writeConfig(t *testing.T, extra string) (path, dir string) {
	t.Helper()
	dir = t.TempDir()
	path = filepath.Join(dir, "config.toml")
	content := fmt.Sprintf("root = %q\naddress = %q\n%s", filepath.Join(dir, "root"), filepath.Join(dir, "run", "streamer.sock"), extra)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, dir
}

func waitForSocket(t *testing.T, d *daemon, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
		select {
		case <-d.exited:
			t.Fatalf("daemon exited early: %v; stderr:\n%s", d.err, d.stderr)
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("socket %s never accepted; stderr:\n%s", path, d.stderr)
}

func TestPrintDefaultConfig(t *testing.T) {
	out, err := exec.Command(binary, "--print-default-config").Output()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, out, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.LoadDaemon(p)
	if err != nil {
		t.Fatalf("printed config does not load: %v\n%s", err, out)
	}
	if err := cfg.Validate(); err != nil {
		t.Errorf("printed config does not validate: %v", err)
	}
	if cfg.Root != config.DefaultDaemon().Root || !reflect.DeepEqual(cfg.Fetch, config.DefaultDaemon().Fetch) {
		t.Errorf("printed config is not the default: %+v", cfg)
	}
}

func TestStartErrors(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T) []string
		want  string
	}{
		{"socket taken", func(t *testing.T) []string {
			cfg, dir := writeConfig(t, "")
			sock := filepath.Join(dir, "run", "streamer.sock")
			os.MkdirAll(filepath.Dir(sock), 0o700)
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			return []string{"--config", cfg}
		}, "in use by another process"},
		{"invalid config", func(t *testing.T) []string {
			cfg, _ := writeConfig(t, "[fetch]\nconcurrency = 0\n")
			return []string{"--config", cfg}
		}, "fetch.concurrency"},
		{"unknown key", func(t *testing.T) []string {
			cfg, _ := writeConfig(t, "colour = \"blue\"\n")
			return []string{"--config", cfg}
		}, "unknown key colour"},
		{"missing explicit config", func(t *testing.T) []string {
			return []string{"--config", filepath.Join(t.TempDir(), "none.toml")}
		}, "no such file"},
		{"bad log level flag", func(t *testing.T) []string {
			cfg, _ := writeConfig(t, "")
			return []string{"--config", cfg, "--log-level", "chatty"}
		}, "log_level"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := start(t, tt.setup(t)...)
			if code := d.wait(t, 10*time.Second); code == 0 {
				t.Fatalf("exit code 0, want failure; stderr:\n%s", d.stderr)
			}
			if !strings.Contains(d.stderr.String(), tt.want) {
				t.Errorf("stderr does not say %q:\n%s", tt.want, d.stderr)
			}
		})
	}
}

func TestServeAndStop(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: the daemon needs root")
	}
	cfgPath, dir := writeConfig(t, fmt.Sprintf("metrics_address = %q\nlog_level = \"error\"\n", filepath.Join(t.TempDir(), "metrics.sock")))
	metricsSock := ""
	if cfg, err := config.LoadDaemon(cfgPath); err == nil {
		metricsSock = cfg.MetricsAddress
	}
	// --address and --root override the file.
	sock := filepath.Join(dir, "flag.sock")
	root := filepath.Join(dir, "flag-root")
	d := start(t, "--config", cfgPath, "--address", sock, "--root", root, "--log-level", "info")
	waitForSocket(t, d, sock)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, "unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "streamer")
	mounts, err := sn.Prepare(ctx, "active", "")
	if err != nil {
		t.Fatalf("Prepare: %v", err)
	}
	if len(mounts) != 1 || !strings.HasPrefix(mounts[0].Source, root) {
		t.Errorf("mounts %+v, want one under --root %s", mounts, root)
	}
	if err := sn.Commit(ctx, "layer", "active"); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	info, err := sn.Stat(ctx, "layer")
	if err != nil || info.Kind != snapshots.KindCommitted {
		t.Fatalf("Stat: %+v, %v; want a committed snapshot", info, err)
	}

	httpc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", metricsSock)
		},
	}}
	for path, want := range map[string]string{"/healthz": "ok", "/readyz": "ready", "/metrics": "go_goroutines"} {
		resp, err := httpc.Get("http://metrics" + path)
		if err != nil {
			t.Errorf("GET %s: %v", path, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
			t.Errorf("GET %s: %d, body lacks %q", path, resp.StatusCode, want)
		}
	}
	conn.Close()

	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := d.wait(t, 15*time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0; stderr:\n%s", code, d.stderr)
	}
	for _, p := range []string{sock, metricsSock} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket %s after exit: %v, want removed", p, err)
		}
	}
	if !strings.Contains(d.stderr.String(), "shutting down") {
		t.Errorf("no shutdown log at --log-level info:\n%s", d.stderr)
	}
}

// TestContainerdConfigDoc keeps docs/containerd-config.toml in step with the
// daemon's defaults.
func TestContainerdConfigDoc(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "containerd-config.toml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Version      int `toml:"version"`
		ProxyPlugins map[string]struct {
			Type    string `toml:"type"`
			Address string `toml:"address"`
		} `toml:"proxy_plugins"`
		Plugins map[string]struct {
			Containerd struct {
				Snapshotter                string `toml:"snapshotter"`
				DisableSnapshotAnnotations *bool  `toml:"disable_snapshot_annotations"`
			} `toml:"containerd"`
		} `toml:"plugins"`
	}
	if err := toml.Unmarshal(b, &doc); err != nil {
		t.Fatalf("docs/containerd-config.toml: %v", err)
	}
	p := doc.ProxyPlugins["streamer"]
	cri := doc.Plugins["io.containerd.grpc.v1.cri"].Containerd
	switch {
	case doc.Version != 2:
		t.Errorf("version = %d, want 2", doc.Version)
	case p.Type != "snapshot" || p.Address != config.DefaultDaemon().Address:
		t.Errorf("proxy plugin = %+v, want a snapshot plugin at %s", p, config.DefaultDaemon().Address)
	case cri.Snapshotter != "streamer" || cri.DisableSnapshotAnnotations == nil || *cri.DisableSnapshotAnnotations:
		t.Errorf("cri containerd = %+v, want snapshotter streamer with annotations enabled", cri)
	}
}
