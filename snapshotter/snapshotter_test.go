package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/storage"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/containerd/continuity/fs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: needs root to mount overlay and bind mounts")
	}
}

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestConformance runs containerd's own snapshotter suite on ordinary
// snapshots. The suite is told "overlayfs" because that name selects the
// overlay behaviour it expects: renaming a directory of a lower layer fails
// with EXDEV unless the kernel enables redirect_dir, as for containerd's
// overlay snapshotter.
func TestConformance(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := NewSnapshotter(ctx, root, nil)
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	})
}

// bindFS is a real, simple FileSystem: it bind-mounts a prepared directory,
// read-only, for each known layer digest.
type bindFS struct {
	mu      sync.Mutex
	layers  map[string]string // layer digest -> source directory
	broken  map[string]bool   // digests whose Mount mounts, then fails
	mounted map[string]bool   // mountpoints
	mounts  int               // successful Mount calls
	unmnts  int               // successful Unmount calls
	forgot  []string          // layer digests passed to Forget
}

// Forget records the layers the snapshotter says are no longer used.
func (b *bindFS) Forget(ctx context.Context, labels map[string]string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.forgot = append(b.forgot, labels[LabelLayerDigest])
	return nil
}

func newBindFS(layers map[string]string) *bindFS {
	return &bindFS{layers: layers, broken: map[string]bool{}, mounted: map[string]bool{}}
}

func (b *bindFS) Mount(ctx context.Context, mp string, labels map[string]string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	dgst := labels[LabelLayerDigest]
	src, ok := b.layers[dgst]
	if !ok {
		return fmt.Errorf("layer %s: %w", dgst, ErrNotStreamable)
	}
	if err := unix.Mount(src, mp, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s: %w", src, err)
	}
	if b.broken[dgst] {
		return errors.New("mount half done, then broke")
	}
	if err := unix.Mount("", mp, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		unix.Unmount(mp, 0)
		return fmt.Errorf("make %s read-only: %w", mp, err)
	}
	b.mounted[mp] = true
	b.mounts++
	return nil
}

func (b *bindFS) Check(ctx context.Context, mp string, labels map[string]string) error {
	b.mu.Lock()
	known := b.mounted[mp]
	b.mu.Unlock()
	ok, err := isMountPoint(mp)
	if err != nil {
		return err
	}
	if !known || !ok {
		return fmt.Errorf("%s is not mounted", mp)
	}
	return nil
}

func (b *bindFS) Unmount(ctx context.Context, mp string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.mounted[mp] {
		return fmt.Errorf("%s: not mounted by this filesystem", mp)
	}
	if err := unix.Unmount(mp, 0); err != nil {
		return err
	}
	delete(b.mounted, mp)
	b.unmnts++
	return nil
}

func (b *bindFS) Usage(ctx context.Context, mp string) (snapshots.Usage, error) {
	du, err := fs.DiskUsage(ctx, mp)
	return snapshots.Usage(du), err
}

func (b *bindFS) counts() (mounts, unmounts int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.mounts, b.unmnts
}

// unmountAllUnder detaches every mount under dir, deepest first, so a failed
// test leaves nothing mounted.
func unmountAllUnder(t *testing.T, dir string) {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Errorf("read mount table: %v", err)
		return
	}
	for i := len(ms) - 1; i >= 0; i-- {
		if err := unix.Unmount(ms[i].Mountpoint, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", ms[i].Mountpoint, err)
		}
	}
}

// env is a snapshotter root plus source trees for layers.
type env struct {
	root   string
	layers map[string]string
}

func newEnv(t *testing.T, files map[string]map[string]string) *env {
	t.Helper()
	requireRoot(t)
	dir := t.TempDir()
	// Unmount before TempDir's removal, which runs after this cleanup.
	t.Cleanup(func() { unmountAllUnder(t, dir) })
	e := &env{root: filepath.Join(dir, "root"), layers: map[string]string{}}
	for dgst, tree := range files {
		src := filepath.Join(dir, "layers", strings.TrimPrefix(dgst, "sha256:"))
		for name, content := range tree {
			p := filepath.Join(src, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		e.layers[dgst] = src
	}
	return e
}

func (e *env) open(t *testing.T, ctx context.Context, fsys FileSystem) *snapshotter {
	t.Helper()
	sn, err := NewSnapshotter(ctx, e.root, fsys)
	if err != nil {
		t.Fatalf("NewSnapshotter: %v", err)
	}
	return sn.(*snapshotter)
}

func layerLabels(target, dgst string) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{
		LabelSnapshotRef:    target,
		LabelImageRef:       "registry.test/app:1",
		LabelManifestDigest: "sha256:manifest",
		LabelLayerDigest:    dgst,
		LabelImageLayers:    "sha256:a,sha256:b",
	})
}

// prepareRemote runs containerd's side of the protocol for one layer and
// expects the layer to be mounted remotely.
func prepareRemote(t *testing.T, ctx context.Context, sn snapshots.Snapshotter, target, parent, dgst string) {
	t.Helper()
	_, err := sn.Prepare(ctx, "extract-"+target, parent, layerLabels(target, dgst))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of remote layer %s: got %v, want an ErrAlreadyExists", dgst, err)
	}
}

// readMerged mounts mounts on a fresh directory and reads files from it.
func readMerged(t *testing.T, mounts []mount.Mount, names ...string) map[string]string {
	t.Helper()
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatalf("mount %+v: %v", mounts, err)
	}
	defer func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Errorf("unmount: %v", err)
		}
	}()
	got := map[string]string{}
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join(target, n))
		if err != nil {
			got[n] = "<" + err.Error() + ">"
			continue
		}
		got[n] = string(b)
	}
	return got
}

func assertFiles(t *testing.T, got, want map[string]string) {
	t.Helper()
	for n, w := range want {
		if got[n] != w {
			t.Errorf("file %s: got %q, want %q", n, got[n], w)
		}
	}
}

func assertMounted(t *testing.T, mp string, want bool) {
	t.Helper()
	got, err := isMountPoint(mp)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("%s mounted = %v, want %v", mp, got, want)
	}
}

func (s *snapshotter) mountpointOf(t *testing.T, ctx context.Context, key string) string {
	t.Helper()
	var id string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		t.Fatalf("id of %s: %v", key, err)
	}
	return s.upper(id)
}

var twoLayers = map[string]map[string]string{
	"sha256:a": {"a": "A", "shared": "from A", "dir/x": "x"},
	"sha256:b": {"b": "B", "shared": "from B"},
}

func TestRemotePrepare(t *testing.T) {
	e := newEnv(t, twoLayers)
	ctx := testContext(t)
	fsys := newBindFS(e.layers)
	sn := e.open(t, ctx, fsys)
	t.Cleanup(func() { sn.Close() })

	prepareRemote(t, ctx, sn, "chain-a", "", "sha256:a")

	info, err := sn.Stat(ctx, "chain-a")
	if err != nil {
		t.Fatalf("Stat of the target: %v", err)
	}
	if info.Kind != snapshots.KindCommitted {
		t.Errorf("kind = %v, want committed", info.Kind)
	}
	for k, want := range map[string]string{
		LabelRemote:      "true",
		LabelSnapshotRef: "chain-a",
		LabelLayerDigest: "sha256:a",
		LabelImageRef:    "registry.test/app:1",
	} {
		if info.Labels[k] != want {
			t.Errorf("label %s = %q, want %q", k, info.Labels[k], want)
		}
	}
	if _, err := sn.Stat(ctx, "extract-chain-a"); !errdefs.IsNotFound(err) {
		t.Errorf("Stat of the prepare key after a remote commit: got %v, want not found", err)
	}
	assertMounted(t, sn.mountpointOf(t, ctx, "chain-a"), true)

	// A second pull of the same layer is answered from the snapshot.
	_, err = sn.Prepare(ctx, "extract-again", "", layerLabels("chain-a", "sha256:a"))
	if !errdefs.IsAlreadyExists(err) {
		t.Errorf("second Prepare: got %v, want ErrAlreadyExists", err)
	}
	if m, _ := fsys.counts(); m != 1 {
		t.Errorf("Mount called %d times, want 1", m)
	}
}

func TestRemoteStackedLayers(t *testing.T) {
	e := newEnv(t, twoLayers)
	ctx := testContext(t)
	sn := e.open(t, ctx, newBindFS(e.layers))
	t.Cleanup(func() { sn.Close() })

	prepareRemote(t, ctx, sn, "chain-a", "", "sha256:a")
	prepareRemote(t, ctx, sn, "chain-b", "chain-a", "sha256:b")

	want := map[string]string{"a": "A", "b": "B", "shared": "from B", "dir/x": "x"}
	tests := []struct {
		name     string
		create   func() ([]mount.Mount, error)
		wantType string
	}{
		{"active on two remote layers", func() ([]mount.Mount, error) { return sn.Prepare(ctx, "container", "chain-b") }, "overlay"},
		{"view on two remote layers", func() ([]mount.Mount, error) { return sn.View(ctx, "view-b", "chain-b") }, "overlay"},
		{"view on one remote layer", func() ([]mount.Mount, error) { return sn.View(ctx, "view-a", "chain-a") }, "bind"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mounts, err := tt.create()
			if err != nil {
				t.Fatal(err)
			}
			if len(mounts) != 1 || mounts[0].Type != tt.wantType {
				t.Fatalf("mounts = %+v, want one %s mount", mounts, tt.wantType)
			}
			w := want
			if tt.wantType == "bind" {
				w = twoLayers["sha256:a"]
			}
			assertFiles(t, readMerged(t, mounts, "a", "b", "shared", "dir/x"), w)
		})
	}

	// The container's writes go to its own upper directory.
	mounts, err := sn.Mounts(ctx, "container")
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	werr := os.WriteFile(filepath.Join(target, "shared"), []byte("written"), 0o644)
	if err := mount.UnmountAll(target, 0); err != nil {
		t.Fatal(err)
	}
	if werr != nil {
		t.Fatalf("write in container: %v", werr)
	}
	if b, err := os.ReadFile(filepath.Join(e.layers["sha256:b"], "shared")); err != nil || string(b) != "from B" {
		t.Errorf("layer source changed: %q, %v", b, err)
	}
}

func TestFallback(t *testing.T) {
	tests := []struct {
		name   string
		digest string
	}{
		{"not streamable", "sha256:unknown"},
		{"mount fails half way", "sha256:a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, twoLayers)
			ctx := testContext(t)
			fsys := newBindFS(e.layers)
			fsys.broken["sha256:a"] = true
			sn := e.open(t, ctx, fsys)
			t.Cleanup(func() { sn.Close() })

			mounts, err := sn.Prepare(ctx, "extract", "", layerLabels("chain", tt.digest))
			if err != nil {
				t.Fatalf("Prepare: got %v, want an ordinary snapshot", err)
			}
			info, err := sn.Stat(ctx, "extract")
			if err != nil || info.Kind != snapshots.KindActive {
				t.Fatalf("Stat: %+v, %v; want an active snapshot", info, err)
			}
			assertMounted(t, sn.mountpointOf(t, ctx, "extract"), false)

			// containerd then unpacks the layer itself and commits.
			target := t.TempDir()
			if err := mount.All(mounts, target); err != nil {
				t.Fatal(err)
			}
			werr := os.WriteFile(filepath.Join(target, "pulled"), []byte("p"), 0o644)
			if err := mount.UnmountAll(target, 0); err != nil {
				t.Fatal(err)
			}
			if werr != nil {
				t.Fatal(werr)
			}
			if err := sn.Commit(ctx, "chain", "extract"); err != nil {
				t.Fatalf("Commit: %v", err)
			}
			info, err = sn.Stat(ctx, "chain")
			if err != nil || isRemote(info.Labels) {
				t.Errorf("committed fallback snapshot: %+v, %v; want a local one", info, err)
			}
		})
	}
}

func TestRemoveUnmounts(t *testing.T) {
	e := newEnv(t, twoLayers)
	ctx := testContext(t)
	fsys := newBindFS(e.layers)
	sn := e.open(t, ctx, fsys)
	t.Cleanup(func() { sn.Close() })

	prepareRemote(t, ctx, sn, "chain-a", "", "sha256:a")
	mp := sn.mountpointOf(t, ctx, "chain-a")
	if err := sn.Remove(ctx, "chain-a"); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	assertMounted(t, mp, false)
	if _, err := os.Stat(filepath.Dir(mp)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("snapshot directory: got %v, want removed", err)
	}
	if _, u := fsys.counts(); u != 1 {
		t.Errorf("Unmount called %d times, want 1", u)
	}
	fsys.mu.Lock()
	forgot := fsys.forgot
	fsys.mu.Unlock()
	if len(forgot) != 1 || forgot[0] != "sha256:a" {
		t.Errorf("Forget called for %v, want [sha256:a] once the snapshot is removed", forgot)
	}
	// The layer's source is untouched: RemoveAll never walked into it.
	if _, err := os.Stat(filepath.Join(e.layers["sha256:a"], "a")); err != nil {
		t.Errorf("layer source damaged: %v", err)
	}
}

func TestUsage(t *testing.T) {
	e := newEnv(t, map[string]map[string]string{"sha256:a": {"a": strings.Repeat("x", 10000)}})
	ctx := testContext(t)
	sn := e.open(t, ctx, newBindFS(e.layers))
	t.Cleanup(func() { sn.Close() })

	prepareRemote(t, ctx, sn, "chain-a", "", "sha256:a")
	u, err := sn.Usage(ctx, "chain-a")
	if err != nil {
		t.Fatal(err)
	}
	if u.Size < 10000 || u.Inodes < 2 {
		t.Errorf("remote usage = %+v, want the layer's bytes (>= 10000) and inodes", u)
	}

	mounts, err := sn.Prepare(ctx, "active", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mounts[0].Source, "f"), make([]byte, 5000), 0o644); err != nil {
		t.Fatal(err)
	}
	u, err = sn.Usage(ctx, "active")
	if err != nil {
		t.Fatal(err)
	}
	if u.Size < 5000 {
		t.Errorf("active usage = %+v, want >= 5000 bytes", u)
	}
}

func TestCheckRemountsDeadLayer(t *testing.T) {
	e := newEnv(t, twoLayers)
	ctx := testContext(t)
	fsys := newBindFS(e.layers)
	sn := e.open(t, ctx, fsys)
	t.Cleanup(func() { sn.Close() })

	prepareRemote(t, ctx, sn, "chain-a", "", "sha256:a")
	if _, err := sn.Prepare(ctx, "container", "chain-a"); err != nil {
		t.Fatal(err)
	}
	// The layer's mount dies behind the filesystem's back.
	mp := sn.mountpointOf(t, ctx, "chain-a")
	if err := unix.Unmount(mp, 0); err != nil {
		t.Fatal(err)
	}
	mounts, err := sn.Mounts(ctx, "container")
	if err != nil {
		t.Fatalf("Mounts: %v", err)
	}
	assertMounted(t, mp, true)
	assertFiles(t, readMerged(t, mounts, "a"), map[string]string{"a": "A"})
	if m, _ := fsys.counts(); m != 2 {
		t.Errorf("Mount called %d times, want 2", m)
	}
}

func TestRestore(t *testing.T) {
	e := newEnv(t, twoLayers)
	ctx := testContext(t)
	sn1 := e.open(t, ctx, newBindFS(e.layers))
	prepareRemote(t, ctx, sn1, "chain-a", "", "sha256:a")
	prepareRemote(t, ctx, sn1, "chain-b", "chain-a", "sha256:b")
	if _, err := sn1.Prepare(ctx, "container", "chain-b"); err != nil {
		t.Fatal(err)
	}
	mpA := sn1.mountpointOf(t, ctx, "chain-a")
	mpB := sn1.mountpointOf(t, ctx, "chain-b")

	// Crash: no Close. The metadata file and root lock are released as the
	// kernel would; layer a's mount died with the process, layer b's is left
	// stale.
	if err := sn1.ms.Close(); err != nil {
		t.Fatal(err)
	}
	sn1.lock.Close()
	if err := unix.Unmount(mpA, 0); err != nil {
		t.Fatal(err)
	}

	t.Run("layers mounted again before serving", func(t *testing.T) {
		fsys := newBindFS(e.layers)
		sn := e.open(t, ctx, fsys)
		if m, _ := fsys.counts(); m != 2 {
			t.Errorf("Mount called %d times at start, want 2", m)
		}
		assertMounted(t, mpA, true)
		assertMounted(t, mpB, true)
		mounts, err := sn.Mounts(ctx, "container")
		if err != nil {
			t.Fatal(err)
		}
		assertFiles(t, readMerged(t, mounts, "a", "b", "shared"), map[string]string{"a": "A", "b": "B", "shared": "from B"})
		if err := sn.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		assertMounted(t, mpA, false)
		assertMounted(t, mpB, false)
	})

	t.Run("failed restore keeps the snapshot and retries on use", func(t *testing.T) {
		fsys := newBindFS(map[string]string{"sha256:b": e.layers["sha256:b"]})
		sn := e.open(t, ctx, fsys)
		t.Cleanup(func() { sn.Close() })
		if _, err := sn.Stat(ctx, "chain-a"); err != nil {
			t.Fatalf("snapshot of the unrestorable layer: %v", err)
		}
		assertMounted(t, mpA, false)
		_, err := sn.Mounts(ctx, "container")
		if !errdefs.IsUnavailable(err) {
			t.Fatalf("Mounts with a dead layer: got %v, want ErrUnavailable", err)
		}
		// The layer's data is back (e.g. the registry answers again).
		fsys.mu.Lock()
		fsys.layers["sha256:a"] = e.layers["sha256:a"]
		fsys.mu.Unlock()
		mounts, err := sn.Mounts(ctx, "container")
		if err != nil {
			t.Fatalf("Mounts after the layer came back: %v", err)
		}
		assertFiles(t, readMerged(t, mounts, "a", "b"), map[string]string{"a": "A", "b": "B"})
	})
}

func TestRootInUse(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testContext(t)
	sn := e.open(t, ctx, nil)
	_, err := NewSnapshotter(ctx, e.root, nil)
	if err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("second snapshotter on one root: got %v, want an in-use error", err)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	sn2, err := NewSnapshotter(ctx, e.root, nil)
	if err != nil {
		t.Fatalf("reopen after Close: %v", err)
	}
	sn2.Close()
}

func TestCloseUnmounts(t *testing.T) {
	e := newEnv(t, twoLayers)
	ctx := testContext(t)
	sn := e.open(t, ctx, newBindFS(e.layers))
	prepareRemote(t, ctx, sn, "chain-a", "", "sha256:a")
	mp := sn.mountpointOf(t, ctx, "chain-a")
	if err := sn.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	assertMounted(t, mp, false)
	if err := sn.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestConcurrentRemotePrepare(t *testing.T) {
	e := newEnv(t, twoLayers)
	ctx := testContext(t)
	fsys := newBindFS(e.layers)
	sn := e.open(t, ctx, fsys)
	t.Cleanup(func() { sn.Close() })

	const pulls = 4
	errs := make(chan error, pulls)
	for i := range pulls {
		go func() {
			_, err := sn.Prepare(ctx, fmt.Sprintf("extract-%d", i), "", layerLabels("chain-a", "sha256:a"))
			errs <- err
		}()
	}
	for range pulls {
		if err := <-errs; !errdefs.IsAlreadyExists(err) {
			t.Errorf("Prepare: got %v, want ErrAlreadyExists", err)
		}
	}
	if m, u := fsys.counts(); m-u != 1 {
		t.Errorf("%d mounts and %d unmounts, want exactly one layer left mounted", m, u)
	}
	var keys []string
	if err := sn.Walk(ctx, func(ctx context.Context, info snapshots.Info) error {
		keys = append(keys, info.Name)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0] != "chain-a" {
		t.Errorf("snapshots = %v, want only chain-a", keys)
	}
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(e.root))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 {
		t.Errorf("%d mounts under root, want 1", len(ms))
	}
}
