package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/streamer-dev/streamer/converter"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/integration/harness"
	"github.com/streamer-dev/streamer/nodeconfig"
)

// checkNode is a node's files for check: a snapshotter config and a
// containerd config in a temp dir, and optionally a listening socket.
type checkNode struct {
	dir, config, containerdConfig, sock string
}

func newCheckNode(t *testing.T, cacheMax string, patched bool) checkNode {
	t.Helper()
	dir := t.TempDir()
	n := checkNode{
		dir:              dir,
		config:           filepath.Join(dir, "config.toml"),
		containerdConfig: filepath.Join(dir, "containerd.toml"),
		sock:             filepath.Join(dir, "run", "streamer.sock"),
	}
	writeFile(t, n.config, "root = "+quote(filepath.Join(dir, "root"))+"\naddress = "+quote(n.sock)+"\n[cache]\nmax_bytes = "+quote(cacheMax)+"\n")
	ccfg := []byte("version = 2\n")
	if patched {
		var err error
		if ccfg, _, err = nodeconfig.Apply(ccfg, nodeconfig.Options{Address: n.sock}); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, n.containerdConfig, string(ccfg))
	return n
}

// listen serves n.sock (accepting and closing) with the given mode.
func (n checkNode) listen(t *testing.T, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(n.sock), 0o700); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", n.sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	if err := os.Chmod(n.sock, mode); err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

func (n checkNode) check(t *testing.T, extra ...string) (int, string) {
	t.Helper()
	return runBinary(t, append([]string{"check", "--config", n.config, "--containerd-config", n.containerdConfig, "--timeout", "15s"}, extra...)...)
}

// requireLines fails t unless every wanted line prefix is in out.
func requireLines(t *testing.T, out string, want []string) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for _, w := range want {
		found := false
		for _, l := range lines {
			if strings.HasPrefix(l, w) {
				found = true
				break
			}
		}
		if !found {
			t.Errorf("no line starting %q in:\n%s", w, out)
		}
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, "OK   ") && !strings.HasPrefix(l, "FAIL ") {
			t.Errorf("line %q is neither OK nor FAIL", l)
		}
		if strings.HasPrefix(l, "FAIL ") && !strings.Contains(l, "; fix: ") {
			t.Errorf("FAIL line without a fix: %q", l)
		}
	}
}

func requireHost(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("SKIPPED: no /dev/fuse on this machine; check's host lines would differ")
	}
	if _, err := exec.LookPath("containerd"); err != nil {
		t.Skip("SKIPPED: containerd is not installed")
	}
}

func TestCheck(t *testing.T) {
	requireHost(t)
	tests := []struct {
		name     string
		setup    func(t *testing.T) checkNode
		args     []string
		wantCode int
		want     []string
	}{
		{"healthy node", func(t *testing.T) checkNode {
			n := newCheckNode(t, "1MiB", true)
			n.listen(t, 0o660)
			return n
		}, nil, 0, []string{
			"OK   config ", "OK   /dev/fuse opens read-write", "OK   kernel filesystem fuse available",
			"OK   kernel filesystem overlay available", "OK   containerd 1.", "OK   containerd config has proxy plugin streamer at ",
			"OK   CRI snapshotter is streamer", "OK   CRI passes snapshot annotations",
			"OK   snapshotter socket ", "OK   snapshotter serves on ", "OK   cache ",
		}},
		{"nothing installed", func(t *testing.T) checkNode {
			return newCheckNode(t, "1MiB", false)
		}, nil, 1, []string{
			"OK   /dev/fuse", "FAIL containerd config " /* no proxy plugin */, "FAIL CRI snapshotter is unset (overlayfs), want streamer",
			"FAIL CRI does not pass snapshot annotations", "FAIL snapshotter socket: ", "OK   cache ",
		}},
		{"socket too open, cache too big", func(t *testing.T) checkNode {
			n := newCheckNode(t, "1000TiB", true)
			n.listen(t, 0o666)
			return n
		}, nil, 1, []string{
			"OK   CRI snapshotter is streamer", "FAIL snapshotter socket ", "OK   snapshotter serves on ", "FAIL cache ",
		}},
		{"stale socket", func(t *testing.T) checkNode {
			n := newCheckNode(t, "1MiB", true)
			os.MkdirAll(filepath.Dir(n.sock), 0o700)
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: n.sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			// Closed without removing its file: what a crashed daemon leaves.
			l.SetUnlinkOnClose(false)
			l.Close()
			os.Chmod(n.sock, 0o660)
			return n
		}, nil, 1, []string{"OK   snapshotter socket ", "FAIL snapshotter socket " /* nobody serves */}},
		{"no containerd binary", func(t *testing.T) checkNode {
			n := newCheckNode(t, "1MiB", true)
			n.listen(t, 0o660)
			return n
		}, []string{"--containerd-bin", "/nonexistent/containerd"}, 1, []string{
			"FAIL containerd --version: ", "OK   snapshotter serves on ",
		}},
		{"registry unreachable", func(t *testing.T) checkNode {
			n := newCheckNode(t, "1MiB", true)
			n.listen(t, 0o660)
			return n
		}, []string{"--image", "127.0.0.1:1/team/app:1"}, 1, []string{
			"OK   CRI snapshotter is streamer", "FAIL registry 127.0.0.1:1: ",
		}},
		{"quick, serving", func(t *testing.T) checkNode {
			n := newCheckNode(t, "1MiB", false)
			n.listen(t, 0o660)
			return n
		}, []string{"--quick"}, 0, []string{"OK   snapshotter socket ", "OK   snapshotter serves on "}},
		{"quick, not serving", func(t *testing.T) checkNode {
			return newCheckNode(t, "1MiB", true)
		}, []string{"--quick"}, 1, []string{"FAIL snapshotter socket: "}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := tt.setup(t)
			code, out := n.check(t, tt.args...)
			if code != tt.wantCode {
				t.Errorf("exit %d, want %d:\n%s", code, tt.wantCode, out)
			}
			requireLines(t, out, tt.want)
			if strings.Contains(strings.Join(tt.args, " "), "--quick") && strings.Contains(out, "containerd") {
				t.Errorf("--quick checked more than the daemon:\n%s", out)
			}
		})
	}
}

func TestCheckBadConfig(t *testing.T) {
	n := newCheckNode(t, "1MiB", true)
	writeFile(t, n.config, "[fetch]\nconcurrency = 0\n")
	code, out := n.check(t)
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	requireLines(t, out, []string{"FAIL config " + n.config + ": fetch.concurrency"})
}

// TestCheckImage asks a real registry about an image before and after it
// is converted.
func TestCheckImage(t *testing.T) {
	requireHost(t)
	if _, err := exec.LookPath("skopeo"); err != nil {
		t.Skip("SKIPPED: skopeo is not installed; no image can be pushed")
	}
	if _, err := exec.LookPath("docker-registry"); err != nil {
		t.Skip("SKIPPED: docker-registry is not installed")
	}
	dir := t.TempDir()
	reg := harness.StartRegistry(t, filepath.Join(dir, "registry"))
	image := reg.Host + "/team/app:1"
	harness.BuildAndPush(t, filepath.Join(dir, "layout"), image, harness.PushOptions{}, harness.Image{
		Layers: [][]harness.File{{harness.Reg("app/hello.txt", 0o644, []byte("hello"))}},
		Cmd:    []string{"/app/hello"},
	})
	n := newCheckNode(t, "1MiB", true)
	n.listen(t, 0o660)

	code, out := n.check(t, "--image", image)
	if code != 0 {
		t.Errorf("exit %d, want 0:\n%s", code, out)
	}
	requireLines(t, out, []string{"OK   registry " + reg.Host + " reachable: " + image + " is sha256:", "OK   no artifact: " + image + " will be pulled normally"})

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client, err := fetcher.New(fetcher.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ref, err := fetcher.ParseRef(image)
	if err != nil {
		t.Fatal(err)
	}
	res, err := converter.Convert(ctx, client, ref, converter.Options{CacheDir: "-", TempDir: dir})
	if err != nil {
		t.Fatalf("convert: %v", err)
	}
	code, out = n.check(t, "--image", image)
	if code != 0 {
		t.Errorf("exit %d, want 0:\n%s", code, out)
	}
	requireLines(t, out, []string{"OK   artifact found: " + image + " streams from " + res[0].Artifact.Digest.String()})
}

// TestCheckWatch is the DaemonSet's main container: `check --quick
// --watch` keeps running, prints the state when it changes (the daemon
// going from down to serving), not every round, and exits 0 on SIGTERM.
func TestCheckWatch(t *testing.T) {
	n := newCheckNode(t, "1MiB", true)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, "check", "--quick", "--watch=50ms", "--config", n.config)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	waitOutput := func(want string) {
		t.Helper()
		for !strings.Contains(out.String(), want) {
			if ctx.Err() != nil {
				t.Fatalf("check --watch never printed %q:\n%s", want, out.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitOutput("FAIL snapshotter socket: ")
	time.Sleep(300 * time.Millisecond) // several rounds, all failing alike
	n.listen(t, 0o660)
	waitOutput("OK   snapshotter serves on ")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("check --watch after SIGTERM: %v, want exit 0\n%s", err, out.String())
	}
	if got := strings.Count(out.String(), "FAIL snapshotter socket: "); got != 1 {
		t.Errorf("the unchanged failure was printed %d times, want once:\n%s", got, out.String())
	}
}

// syncBuffer is a bytes.Buffer safe for a writing process and a reading test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
