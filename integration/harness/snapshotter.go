package harness

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// Binaries are the project's commands built for a test run.
type Binaries struct {
	Dir         string
	Streamer    string // the streamer CLI
	Snapshotter string // streamer-snapshotter
}

// ModuleRoot finds the directory of the module's go.mod, walking up from
// the working directory.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}

// EnvBinDir is the environment variable that names a directory of already
// built commands (streamer, streamer-snapshotter): BuildBinaries then uses
// them instead of building.
const EnvBinDir = "STREAMER_BIN_DIR"

// BuildBinaries builds ./cmd/... into dir with the go command, or uses the
// binaries in $STREAMER_BIN_DIR when it is set.
func BuildBinaries(ctx context.Context, dir string) (Binaries, error) {
	if d := os.Getenv(EnvBinDir); d != "" {
		dir = d
		b := Binaries{Dir: dir, Streamer: filepath.Join(dir, "streamer"), Snapshotter: filepath.Join(dir, "streamer-snapshotter")}
		for _, p := range []string{b.Streamer, b.Snapshotter} {
			if _, err := os.Stat(p); err != nil {
				return Binaries{}, fmt.Errorf("%s=%s: %w", EnvBinDir, d, err)
			}
		}
		return b, nil
	}
	root, err := ModuleRoot()
	if err != nil {
		return Binaries{}, fmt.Errorf("build binaries: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Binaries{}, fmt.Errorf("build binaries: %w", err)
	}
	gobin := "go"
	if p, err := execLookPath("go"); err != nil {
		if _, err := os.Stat("/usr/local/go/bin/go"); err == nil {
			gobin = "/usr/local/go/bin/go"
		}
	} else {
		gobin = p
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := []string{"build", "-o", dir + "/", "./cmd/..."}
	if out, err := RunCommandIn(ctx, root, gobin, cmd...); err != nil {
		return Binaries{}, fmt.Errorf("build ./cmd/... (the commands must build for the end-to-end tests): %w\n%s", err, out)
	}
	b := Binaries{Dir: dir, Streamer: filepath.Join(dir, "streamer"), Snapshotter: filepath.Join(dir, "streamer-snapshotter")}
	for _, p := range []string{b.Streamer, b.Snapshotter} {
		if _, err := os.Stat(p); err != nil {
			return Binaries{}, fmt.Errorf("build binaries: %s missing after go build: %w", filepath.Base(p), err)
		}
	}
	return b, nil
}

// SnapshotterOptions configures StartSnapshotter.
type SnapshotterOptions struct {
	// Binary is the streamer-snapshotter executable.
	Binary string
	// Dir holds root, socket, config and log; keep it short.
	Dir string
	// Config is the TOML config file's content.
	Config string
	// LogLevel defaults to debug.
	LogLevel string
	// CPUGroup, when set, is the cgroup the daemon runs in (NodeCPU.System).
	CPUGroup *CPUGroup
}

// Snapshotter is a streamer-snapshotter daemon started for a test.
type Snapshotter struct {
	Address    string
	Root       string
	ConfigPath string
	LogPath    string
	opts       SnapshotterOptions
	proc       *Process
	t          TB
}

// StartSnapshotter writes the config, starts the daemon and waits for its
// socket. On cleanup it is stopped (SIGTERM, then SIGKILL) and everything it
// left mounted under Dir is unmounted.
func StartSnapshotter(t TB, o SnapshotterOptions) *Snapshotter {
	t.Helper()
	s := &Snapshotter{
		Address:    filepath.Join(o.Dir, "s.sock"),
		Root:       filepath.Join(o.Dir, "root"),
		ConfigPath: filepath.Join(o.Dir, "snapshotter.toml"),
		LogPath:    filepath.Join(o.Dir, "snapshotter.log"),
		opts:       o,
		t:          t,
	}
	if o.LogLevel == "" {
		s.opts.LogLevel = "debug"
	}
	if err := os.MkdirAll(s.Root, 0o755); err != nil {
		t.Fatalf("snapshotter dirs: %v", err)
	}
	if err := os.WriteFile(s.ConfigPath, []byte(o.Config), 0o644); err != nil {
		t.Fatalf("write snapshotter config: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("snapshotter log tail:\n%s", FileTail(s.LogPath, 40))
		}
		if s.proc != nil && !s.proc.Stop(10*time.Second) {
			t.Logf("snapshotter did not stop on SIGTERM within 10s; killed")
		}
		UnmountAll(t, o.Dir)
	})
	if err := s.Start(); err != nil {
		t.Fatalf("%v", err)
	}
	return s
}

// Start starts the daemon (again) and waits until its socket accepts.
func (s *Snapshotter) Start() error {
	_ = os.Remove(s.Address)
	var err error
	s.proc, err = StartProcess(s.opts.Binary, s.LogPath,
		"--config", s.ConfigPath, "--root", s.Root, "--address", s.Address, "--log-level", s.opts.LogLevel)
	if err != nil {
		return err
	}
	if err := s.opts.CPUGroup.Add(s.proc.PID()); err != nil {
		s.proc.Kill()
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := WaitFor(ctx, s.proc, "snapshotter socket "+s.Address, func(ctx context.Context) error {
		return DialUnix(ctx, s.Address)
	}); err != nil {
		return fmt.Errorf("start streamer-snapshotter: %w\nlog tail:\n%s", err, FileTail(s.LogPath, 40))
	}
	return nil
}

// Stop sends SIGTERM and waits; it reports whether the daemon exited within
// the grace period (it is killed otherwise).
func (s *Snapshotter) Stop(grace time.Duration) bool { return s.proc.Stop(grace) }

// Kill kills the daemon with SIGKILL, as a crash would.
func (s *Snapshotter) Kill() { s.proc.Kill() }

// Restart kills the daemon with SIGKILL and starts it again.
func (s *Snapshotter) Restart() error {
	s.Kill()
	return s.Start()
}

// PID is the process id of the running daemon (the last one started).
func (s *Snapshotter) PID() int { return s.proc.PID() }

// Exited reports whether the daemon has exited.
func (s *Snapshotter) Exited() bool { ok, _ := s.proc.Exited(); return ok }

// LogTail is the end of the daemon's log.
func (s *Snapshotter) LogTail(n int) string { return FileTail(s.LogPath, n) }

// UnixHTTPClient is an HTTP client of the unix socket at socket (the
// snapshotter's metrics address: /metrics, /status, /profile); any host
// name in a URL reaches it. Requests time out after 5 s.
func UnixHTTPClient(socket string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}, Timeout: 5 * time.Second}
}
