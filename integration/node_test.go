package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd"
	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/integration/harness"
	"github.com/streamer-dev/streamer/internal/testenv"
)

// node is one Kubernetes node: containerd with the CRI plugin on
// streamer-snapshotter, reaching a registry through two proxies: a counting
// one that logs every blob range (what the node fetched) and the testenv one
// that injects faults.
type node struct {
	dir    string
	reg    *testenv.Reg
	faults *testenv.Proxy
	count  *harness.CountingProxy
	sn     *harness.Snapshotter
	cd     *harness.Containerd
	cri    *harness.CRI
	pause  string
	cfg    harness.SnapshotterConfig
}

// nodeReadTimeout is the FUSE read time limit the node tests configure.
const nodeReadTimeout = 8 * time.Second

// startNode starts a node on the system containerd (Debian's 1.6). Tests
// that should hold on every containerd use forEachContainerd and
// startNodeOn instead.
func startNode(t *testing.T) *node {
	t.Helper()
	return startNodeOn(t, systemContainerd(t))
}

// startNodeOn starts a node whose containerd is rt.
func startNodeOn(t *testing.T, rt harness.ContainerdRuntime) *node {
	t.Helper()
	return startNodeWith(t, rt, testenv.RegistryOptions{})
}

// startNodeWith starts a node whose containerd is rt and whose registry
// runs with ro.
func startNodeWith(t *testing.T, rt harness.ContainerdRuntime, ro testenv.RegistryOptions) *node {
	t.Helper()
	needRoot(t)
	b := needBinaries(t)
	n := &node{dir: tempDir(t, "sn-")}
	n.reg = testenv.Registry(t, ro)
	n.faults = testenv.CountingProxy(t, n.reg.Host)
	n.count = harness.StartCountingProxy(t, n.faults.Host)

	pause, err := harness.PauseImage()
	if err != nil {
		t.Fatal(err)
	}
	n.pause = n.reg.Ref("pause", ":v1")
	harness.BuildAndPush(t, layoutDir(t, "pause"), n.pause, harness.PushOptions{}, pause)

	n.cfg = harness.SnapshotterConfig{
		Insecure:       []string{n.reg.Host, n.count.Host},
		Mirrors:        map[string][]string{n.reg.Host: {n.count.Host}},
		RequestTimeout: 3 * time.Second,
		ReadTimeout:    nodeReadTimeout,
		Retries:        1,
		Background:     new(false), // the tests count what reads fetch; background_test.go turns it on
	}
	cfg, err := n.cfg.TOML()
	if err != nil {
		t.Fatal(err)
	}
	n.sn = harness.StartSnapshotter(t, harness.SnapshotterOptions{Binary: b.Snapshotter, Dir: filepath.Join(n.dir, "s"), Config: cfg})
	n.cd = harness.StartContainerd(t, rt.Options(harness.ContainerdOptions{
		Dir:                filepath.Join(n.dir, "c"),
		SnapshotterAddress: n.sn.Address,
		SandboxImage:       n.pause,
		Mirrors:            map[string]string{n.reg.Host: "http://" + n.count.Host},
		BaseConfig:         docsContainerdConfig(t),
	}))
	// The matrix is only worth its name if each entry runs what it says.
	if got := "containerd-" + harness.MajorMinor(n.cd.Version); got != rt.Name {
		t.Fatalf("%s runs %s, which reports version %q", rt.Name, n.cd.Binary, n.cd.Version)
	}
	t.Logf("node on containerd %s (%s)", n.cd.Version, n.cd.Binary)
	n.cri = n.cd.CRI(t)
	ctx := testContext(t, time.Minute)
	if _, err := n.cri.PullImage(ctx, n.pause); err != nil {
		t.Fatalf("pull the pause image through the streamer snapshotter: %v", err)
	}
	return n
}

// reconfigure writes n.cfg as the snapshotter's config and restarts it.
func (n *node) reconfigure(t *testing.T) {
	t.Helper()
	cfg, err := n.cfg.TOML()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.sn.ConfigPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := n.sn.Restart(); err != nil {
		t.Fatal(err)
	}
}

// docsContainerdConfig is the documented node config, when it exists.
func docsContainerdConfig(t *testing.T) string {
	t.Helper()
	root, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(root, "docs", "containerd-config.toml")
	if _, err := os.Stat(p); err != nil {
		t.Logf("docs/containerd-config.toml missing; using the harness default node config")
		return ""
	}
	return p
}

// push pushes img as repo:v1 and, when convert is set, makes its streaming
// artifact with `streamer create`. It returns the reference nodes pull.
func (n *node) push(t *testing.T, ctx context.Context, repo string, img harness.Image, convert bool) (string, harness.BuiltImage) {
	t.Helper()
	ref := n.reg.Ref(repo, ":v1")
	lay := harness.BuildAndPush(t, layoutDir(t, repo), ref, harness.PushOptions{}, img)
	if convert {
		if res := streamer(t, ctx, nil, "create", ref); res.Code != 0 {
			t.Fatalf("streamer create %s: %s", ref, res)
		}
	}
	return ref, lay.Images[0]
}

// artifactOf reads the streaming artifact of an image from the registry.
func (n *node) artifactOf(t *testing.T, ctx context.Context, repo string, img harness.BuiltImage) *artifact.Manifest {
	t.Helper()
	arts := registryClient{host: n.reg.Host}.artifactsFor(t, ctx, repo, img.Manifest.Digest)
	if len(arts) != 1 {
		t.Fatalf("%s has %d streaming artifacts, want 1", repo, len(arts))
	}
	return arts[0]
}

func (n *node) fuseMounts() []string { return harness.FuseMountsUnder(n.sn.Root) }

func (n *node) logs(t *testing.T) {
	t.Helper()
	t.Logf("snapshotter log tail:\n%s", n.sn.LogTail(30))
}

// isEIO reports whether a command's stderr shows EIO (glibc and musl word
// it differently).
func isEIO(stderr string) bool {
	return strings.Contains(stderr, "I/O error") || strings.Contains(stderr, "Input/output error")
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// execOK runs a shell script in the container and fails on a non-zero exit.
func execOK(t *testing.T, ctx context.Context, w *harness.WebPod, script string) string {
	t.Helper()
	res, err := w.Exec(ctx, script)
	if err != nil {
		t.Fatalf("%v", err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("exec %q: exit %d\nstdout: %s\nstderr: %s", script, res.ExitCode, res.Stdout, res.Stderr)
	}
	return strings.TrimSpace(res.Stdout)
}

// TestNodeStreamedPod runs a pod from a converted image through CRI: the
// upper layers are FUSE mounts, and the pod answers on its port.
func TestNodeStreamedPod(t *testing.T) {
	forEachContainerd(t, func(t *testing.T, rt harness.ContainerdRuntime) {
		n := startNodeOn(t, rt)
		ctx := testContext(t, 3*time.Minute)
		web, err := harness.WebImage("hello from a streamed image", 0, []harness.File{
			harness.Dir("data", 0o755), harness.Reg("data/file", 0o644, harness.RandomBytes(11, 3<<20)),
		})
		if err != nil {
			t.Fatal(err)
		}
		ref, img := n.push(t, ctx, "web", web, true)
		before := len(n.fuseMounts())
		w := n.cri.RunWebPod(t, ctx, "web", ref, filepath.Join(n.dir, "logs"))
		body, err := harness.HTTPGet(ctx, w.URL)
		if err != nil || body != "hello from a streamed image" {
			t.Fatalf("GET %s: %q, %v", w.URL, body, err)
		}
		if got := len(n.fuseMounts()) - before; got != len(img.Layers) {
			n.logs(t)
			t.Fatalf("%d new FUSE layer mounts, want the image's %d layers streamed", got, len(img.Layers))
		}
		if got := execOK(t, ctx, w, "sha256sum /data/file | cut -d' ' -f1"); got != sha(harness.RandomBytes(11, 3<<20)) {
			t.Fatalf("sha256 of /data/file in the container: %s", got)
		}
		// The pod runs on the runtime's own shim, not whichever is on PATH.
		if rt.Shim != "" {
			shims := n.cd.ShimExecutables()
			if len(shims) == 0 {
				t.Errorf("no shim of containerd %s found running", n.cd.Version)
			}
			for _, exe := range shims {
				if exe != rt.Shim {
					t.Errorf("containerd %s runs shim %s, want %s", n.cd.Version, exe, rt.Shim)
				}
			}
		}
	})
}

// TestNodeRedirectingRegistry streams an image from a registry that
// redirects blob reads to storage, as registries backed by object storage
// or a CDN do: the pod starts and reads the right bytes, and of the
// snapshotter's range reads only the first of each blob asks the
// registry; the rest go to the storage directly.
func TestNodeRedirectingRegistry(t *testing.T) {
	n := startNodeWith(t, systemContainerd(t), testenv.RegistryOptions{RedirectBlobs: true})
	ctx := testContext(t, 3*time.Minute)
	metrics := n.withMetrics(t, false)
	a, b := harness.RandomBytes(91, 3<<20), harness.RandomBytes(92, 3<<20)
	web, err := harness.WebImage("redirected", 0, []harness.File{
		harness.Dir("data", 0o755), harness.Reg("data/a", 0o644, a), harness.Reg("data/b", 0o644, b),
	})
	if err != nil {
		t.Fatal(err)
	}
	ref, img := n.push(t, ctx, "redirected", web, true)
	_, storedBefore := n.reg.Storage.Requests()
	n.count.Reset()
	w := n.cri.RunWebPod(t, ctx, "redirected", ref, filepath.Join(n.dir, "logs"))
	if body, err := harness.HTTPGet(ctx, w.URL); err != nil || body != "redirected" {
		t.Fatalf("GET %s: %q, %v", w.URL, body, err)
	}
	for file, want := range map[string][]byte{"a": a, "b": b} {
		if got := execOK(t, ctx, w, "sha256sum /data/"+file+" | cut -d' ' -f1"); got != sha(want) {
			t.Fatalf("sha256 of /data/%s in the container: %s", file, got)
		}
	}
	var metric [2]float64
	for i, name := range []string{"streamer_fetch_requests_total", "streamer_fetch_redirects_total"} {
		if metric[i], err = scrapeMetric(ctx, metrics, name); err != nil {
			t.Fatal(err)
		}
	}
	requests, redirects := metric[0], metric[1]
	_, stored := n.reg.Storage.Requests()
	stored -= storedBefore
	t.Logf("%d layers: %.0f range reads, %.0f redirected by the registry; the storage served %d range requests, the registry %d blob GETs",
		len(img.Layers), requests, redirects, stored, n.count.BlobRequests())
	if redirects < 1 {
		n.logs(t)
		t.Fatalf("no range read was redirected; the registry redirects every blob read")
	}
	if requests-redirects < 2 {
		t.Errorf("%.0f of %.0f range reads went to the storage without a redirect; want the reads after each blob's first there", requests-redirects, requests)
	}
	if float64(stored) < requests {
		t.Errorf("the storage served %d range requests, fewer than the snapshotter's %.0f range reads", stored, requests)
	}
}

// TestNodeLazy checks that a pod becomes ready having fetched a small part
// of an image whose 64 MiB file it never reads.
func TestNodeLazy(t *testing.T) {
	forEachContainerd(t, func(t *testing.T, rt harness.ContainerdRuntime) {
		n := startNodeOn(t, rt)
		ctx := testContext(t, 3*time.Minute)
		web, err := harness.WebImage("lazy", 0, []harness.File{
			harness.Dir("data", 0o755), harness.Reg("data/unread", 0o644, harness.RandomBytes(64, 64<<20)),
		})
		if err != nil {
			t.Fatal(err)
		}
		ref, img := n.push(t, ctx, "lazy", web, true)
		n.count.Reset()
		start := time.Now()
		n.cri.RunWebPod(t, ctx, "lazy", ref, filepath.Join(n.dir, "logs"))
		fetched, size := n.count.BlobBytes(), img.CompressedSize()
		t.Logf("ready in %v having fetched %d of %d compressed bytes (%.1f%%) in %d blob requests",
			time.Since(start).Round(time.Millisecond), fetched, size, 100*float64(fetched)/float64(size), n.count.BlobRequests())
		if fetched*5 >= size {
			n.logs(t)
			t.Fatalf("fetched %d bytes before the pod was ready, want < 20%% of the image's %d", fetched, size)
		}
	})
}

// TestNodeFallback runs an image that has no streaming artifact through the
// same snapshotter: it is pulled and unpacked normally.
func TestNodeFallback(t *testing.T) {
	forEachContainerd(t, func(t *testing.T, rt harness.ContainerdRuntime) {
		n := startNodeOn(t, rt)
		ctx := testContext(t, 3*time.Minute)
		web, err := harness.WebImage("plain image", 0, []harness.File{harness.Reg("data/plain", 0o644, []byte("plain\n"))})
		if err != nil {
			t.Fatal(err)
		}
		ref, img := n.push(t, ctx, "plain", web, false)
		before := len(n.fuseMounts())
		n.count.Reset()
		w := n.cri.RunWebPod(t, ctx, "plain", ref, filepath.Join(n.dir, "logs"))
		if body, err := harness.HTTPGet(ctx, w.URL); err != nil || body != "plain image" {
			t.Fatalf("GET: %q %v", body, err)
		}
		if got := execOK(t, ctx, w, "cat /data/plain"); got != "plain" {
			t.Fatalf("cat /data/plain: %q", got)
		}
		if after := len(n.fuseMounts()); after != before {
			t.Errorf("FUSE mounts went from %d to %d for an image without artifact", before, after)
		}
		// The layers were downloaded whole.
		if got, want := n.count.BlobBytes(), img.CompressedSize(); got < want {
			t.Errorf("fetched %d blob bytes, want at least the image's %d", got, want)
		}
	})
}

// TestNodeEquivalence compares an image's root filesystem through Streamer
// with the same image unpacked by containerd's overlayfs snapshotter.
func TestNodeEquivalence(t *testing.T) {
	forEachContainerd(t, func(t *testing.T, rt harness.ContainerdRuntime) {
		n := startNodeOn(t, rt)
		ctx := testContext(t, 3*time.Minute)
		ref, img := n.push(t, ctx, "rich", richImage(t), true)
		if _, err := n.cri.PullImage(ctx, ref); err != nil {
			n.logs(t)
			t.Fatal(err)
		}
		if len(n.fuseMounts()) == 0 {
			n.logs(t)
			t.Fatalf("no FUSE mount after pulling a converted image")
		}
		cl := n.cd.Client(t)
		var diffIDs []digest.Digest
		for _, l := range img.Layers {
			diffIDs = append(diffIDs, l.DiffID)
		}
		chain := harness.ChainID(diffIDs)
		streamed := readView(t, ctx, cl, harness.CRINamespace, "streamer", chain, filepath.Join(n.dir, "vs"))
		if _, err := harness.PullUnpacked(ctx, cl, "reference", ref, "overlayfs"); err != nil {
			t.Fatal(err)
		}
		reference := readView(t, ctx, cl, "reference", "overlayfs", chain, filepath.Join(n.dir, "vo"))
		if d := harness.DiffTrees(reference, streamed); len(d) > 0 {
			t.Errorf("%d differences between overlayfs (want) and streamer (got):\n%s", len(d), strings.Join(d, "\n"))
		}
		// Spot checks that the reference is what the image says.
		for p, want := range map[string]string{"data/todelete": "", "gone": "", "opq/old1": "", "opq/new": "reg", "data/chardev": "char", "data/fifo": "fifo", longName: "reg"} {
			if got := reference[p].Type; got != want {
				t.Errorf("reference %s: type %q, want %q", p, got, want)
			}
		}

		// The same rootfs in a running container.
		pod, err := n.cri.RunPod(ctx, "rich", filepath.Join(n.dir, "logs"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = pod.Remove(context.Background()) })
		id, err := pod.StartContainer(ctx, harness.ContainerSpec{Name: "rich", Image: ref, Command: []string{"/bin/sleep", "600"}})
		if err != nil {
			t.Fatal(err)
		}
		if err := n.cri.WaitRunning(ctx, id); err != nil {
			t.Fatal(err)
		}
		res, err := n.cri.Exec(ctx, id, 30*time.Second, "/bin/sh", "-c",
			"cat /etc/app/config; ls /opq; test ! -e /data/todelete && test ! -e /gone && echo deleted; sha256sum /data/big-hardlink2 | cut -c1-12")
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("v2\nnew\ndeleted\n%s\n", sha(harness.RandomBytes(7, 3<<20/2))[:12])
		if res.Stdout != want {
			t.Errorf("in the container: %q (exit %d, %s), want %q", res.Stdout, res.ExitCode, res.Stderr, want)
		}
	})
}

func readView(t *testing.T, ctx context.Context, cl *containerd.Client, ns, snapshotter string, chain digest.Digest, dir string) map[string]harness.Node {
	t.Helper()
	undo := harness.MountView(t, ctx, cl, ns, snapshotter, chain, dir)
	defer undo()
	tree, err := harness.ReadTree(dir)
	if err != nil {
		t.Fatalf("read %s view: %v", snapshotter, err)
	}
	return tree
}

// parseRange parses "bytes=a-b"; the whole blob is [0, max).
func parseRange(r string) (int64, int64) {
	if r == "" {
		return 0, 1 << 62
	}
	r = strings.TrimPrefix(r, "bytes=")
	a, b, _ := strings.Cut(r, "-")
	start, _ := strconv.ParseInt(a, 10, 64)
	end, err := strconv.ParseInt(b, 10, 64)
	if err != nil {
		end = 1 << 62
	}
	return start, end + 1
}

// TestNodeRestart kills the snapshotter with SIGKILL while a container runs,
// starts it again, and runs a new container of the same image: no chunk that
// was fetched before is fetched again.
func TestNodeRestart(t *testing.T) {
	forEachContainerd(t, func(t *testing.T, rt harness.ContainerdRuntime) {
		n := startNodeOn(t, rt)
		ctx := testContext(t, 3*time.Minute)
		content := harness.RandomBytes(21, 4<<20)
		web, err := harness.WebImage("restart", 0, []harness.File{harness.Dir("data", 0o755), harness.Reg("data/file", 0o644, content)})
		if err != nil {
			t.Fatal(err)
		}
		ref, _ := n.push(t, ctx, "restart", web, true)
		n.count.Reset()
		w1 := n.cri.RunWebPod(t, ctx, "first", ref, filepath.Join(n.dir, "logs"))
		if got := execOK(t, ctx, w1, "sha256sum /data/file | cut -d' ' -f1"); got != sha(content) {
			t.Fatalf("first container reads %s", got)
		}
		before := n.count.Fetches()
		if len(before) == 0 {
			t.Fatalf("nothing was fetched by the first container")
		}

		t.Logf("first container: %d blob requests, %d bytes", len(before), n.count.BlobBytes())
		n.sn.Kill()
		if err := n.sn.Start(); err != nil {
			t.Fatal(err)
		}
		n.count.Reset()
		w2 := n.cri.RunWebPod(t, ctx, "second", ref, filepath.Join(n.dir, "logs"))
		if got := execOK(t, ctx, w2, "sha256sum /data/file | cut -d' ' -f1"); got != sha(content) {
			n.logs(t)
			t.Fatalf("second container reads %s", got)
		}
		t.Logf("after the restart: %d blob requests, %d bytes", len(n.count.Fetches()), n.count.BlobBytes())
		for _, f := range n.count.Fetches() {
			s2, e2 := parseRange(f.Range)
			for _, b := range before {
				s1, e1 := parseRange(b.Range)
				if b.Blob == f.Blob && s2 < e1 && s1 < e2 && b.Bytes > 0 {
					n.logs(t)
					t.Errorf("after restart %s range %q was fetched again (first fetched %q)", f.Blob, f.Range, b.Range)
				}
			}
		}
	})
}

// TestNodeTampering has the registry side alter streaming blob bytes: the
// read fails with EIO, and the altered bytes end up in no cache.
func TestNodeTampering(t *testing.T) {
	forEachContainerd(t, func(t *testing.T, rt harness.ContainerdRuntime) {
		n := startNodeOn(t, rt)
		ctx := testContext(t, 3*time.Minute)
		content := harness.RandomBytes(31, 2<<20)
		web, err := harness.WebImage("tamper", 0, []harness.File{harness.Dir("data", 0o755), harness.Reg("data/file", 0o644, content)})
		if err != nil {
			t.Fatal(err)
		}
		ref, img := n.push(t, ctx, "tamper", web, true)
		art := n.artifactOf(t, ctx, "tamper", img)
		target := art.Layers[len(art.Layers)-1].Blob.Digest.String()
		var altered [][]byte
		n.faults.SetTamper(func(path string, body []byte) []byte {
			if !strings.HasSuffix(path, target) || len(body) < 256 {
				return body
			}
			out := append([]byte(nil), body...)
			mid := len(out) / 2
			for i := mid - 64; i < mid+64; i++ {
				out[i] ^= 0xff
			}
			altered = append(altered, append([]byte(nil), out[mid-64:mid+64]...))
			return out
		})
		w := n.cri.RunWebPod(t, ctx, "tamper", ref, filepath.Join(n.dir, "logs"))
		start := time.Now()
		res, err := w.Exec(ctx, "cat /data/file > /dev/null")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("read of tampered data: exit %d in %v: %s", res.ExitCode, time.Since(start).Round(time.Millisecond), strings.TrimSpace(res.Stderr))
		if res.ExitCode == 0 {
			n.logs(t)
			t.Fatalf("reading a file whose chunks were altered succeeded")
		}
		if !isEIO(res.Stderr) {
			t.Errorf("want EIO (I/O error), got %q", res.Stderr)
		}
		if len(altered) == 0 {
			t.Fatalf("the tamper function altered nothing")
		}
		_ = filepath.WalkDir(n.sn.Root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			data, err := os.ReadFile(p)
			if err != nil {
				return nil
			}
			for _, a := range altered {
				if bytes.Contains(data, a) {
					t.Errorf("altered bytes cached in %s", p)
				}
			}
			return nil
		})
		n.faults.SetTamper(nil)
		if got := execOK(t, ctx, w, "sha256sum /data/file | cut -d' ' -f1"); got != sha(content) {
			t.Fatalf("after the registry is honest again the file reads %s", got)
		}
	})
}

// TestNodeRegistryDown stops the registry while a pod runs: an uncached
// file fails with EIO within the read timeout, cached data still reads.
func TestNodeRegistryDown(t *testing.T) {
	forEachContainerd(t, func(t *testing.T, rt harness.ContainerdRuntime) {
		n := startNodeOn(t, rt)
		ctx := testContext(t, 3*time.Minute)
		a, b := harness.RandomBytes(41, 2<<20), harness.RandomBytes(42, 2<<20)
		web, err := harness.WebImage("down", 0, []harness.File{
			harness.Dir("data", 0o755), harness.Reg("data/a", 0o644, a), harness.Reg("data/b", 0o644, b),
		})
		if err != nil {
			t.Fatal(err)
		}
		ref, _ := n.push(t, ctx, "down", web, true)
		w := n.cri.RunWebPod(t, ctx, "down", ref, filepath.Join(n.dir, "logs"))
		if got := execOK(t, ctx, w, "sha256sum /data/a | cut -d' ' -f1"); got != sha(a) {
			t.Fatalf("/data/a reads %s", got)
		}
		n.reg.Stop()
		// Make the next read of /data/a go through FUSE rather than the page cache.
		_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200)
		start := time.Now()
		res, err := w.Exec(ctx, "cat /data/b > /dev/null")
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("read of uncached data with the registry down: exit %d in %v: %s", res.ExitCode, took.Round(time.Millisecond), strings.TrimSpace(res.Stderr))
		if res.ExitCode == 0 {
			t.Fatalf("reading uncached data succeeded with the registry down")
		}
		if !isEIO(res.Stderr) {
			t.Errorf("want EIO (I/O error), got %q", res.Stderr)
		}
		// Generous bound: the configured read timeout plus exec overhead.
		if limit := nodeReadTimeout + 10*time.Second; took > limit {
			t.Errorf("the failing read took %v, want it bounded by the read timeout (%v + slack)", took, nodeReadTimeout)
		}
		if got := execOK(t, ctx, w, "sha256sum /data/a | cut -d' ' -f1"); got != sha(a) {
			t.Fatalf("cached /data/a reads %s with the registry down", got)
		}
	})
}
