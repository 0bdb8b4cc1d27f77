package harness

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func TestBuildAndPush(t *testing.T) {
	dir := ShortTempDir(t, "hs-")
	reg := StartRegistry(t, filepath.Join(dir, "reg"))
	img, err := WebImage("hello", 8080, []File{Reg("big", 0o644, RandomBytes(1, 1<<20)), Symlink("link", "big")})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		o    PushOptions
		imgs []Image
	}{
		{"oci", PushOptions{}, []Image{img}},
		{"docker", PushOptions{Docker: true}, []Image{img}},
		{"index", PushOptions{}, []Image{img, {Layers: img.Layers, Architecture: "arm64"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lay := BuildAndPush(t, filepath.Join(dir, tc.name), reg.Host+"/web/"+tc.name+":v1", tc.o, tc.imgs...)
			if len(lay.Images) != len(tc.imgs) {
				t.Fatalf("images: %d", len(lay.Images))
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodHead, "http://"+reg.Host+"/v2/web/"+tc.name+"/blobs/"+lay.Images[0].Layers[0].Digest.String(), nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("layer blob: %s", resp.Status)
			}
		})
	}
}

// TestContainerdOverlay runs a web pod through CRI on containerd's own
// overlayfs snapshotter: the harness works without Streamer.
func TestContainerdOverlay(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("SKIP: containerd needs root")
	}
	dir := ShortTempDir(t, "hc-")
	reg := StartRegistry(t, filepath.Join(dir, "reg"))
	pause, err := PauseImage()
	if err != nil {
		t.Fatal(err)
	}
	BuildAndPush(t, filepath.Join(dir, "pause"), reg.Host+"/pause:v1", PushOptions{}, pause)
	web, err := WebImage("hello overlay", 1, []File{Reg("data/x", 0o644, []byte("x"))})
	if err != nil {
		t.Fatal(err)
	}
	BuildAndPush(t, filepath.Join(dir, "web"), reg.Host+"/web:v1", PushOptions{}, web)
	cd := StartContainerd(t, ContainerdOptions{
		Dir: filepath.Join(dir, "cd"), SandboxImage: reg.Host + "/pause:v1",
		Mirrors: map[string]string{reg.Host: "http://" + reg.Host},
	})
	cri := cd.CRI(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	w := cri.RunWebPod(t, ctx, "web", reg.Host+"/web:v1", filepath.Join(dir, "logs"))
	body, err := HTTPGet(ctx, w.URL)
	if err != nil || body != "hello overlay" {
		t.Fatalf("GET: %q %v", body, err)
	}
	res, err := w.Exec(ctx, "cat /data/x")
	if err != nil || res.Stdout != "x" {
		t.Fatalf("exec: %+v %v", res, err)
	}
}

// TestTreeEquivalenceNative unpacks an image with every kind of entry with
// containerd's overlayfs and native snapshotters and compares the trees:
// the comparison the end-to-end equivalence test relies on.
func TestTreeEquivalenceNative(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("SKIP: containerd needs root")
	}
	dir := ShortTempDir(t, "ht-")
	reg := StartRegistry(t, filepath.Join(dir, "reg"))
	bb, err := BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	x := Reg("a/x", 0o4750, []byte("x"))
	x.UID, x.GID, x.Xattrs = 7, 8, map[string]string{"user.k": "v", "security.capability": string([]byte{1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})}
	img := Image{Layers: [][]File{bb,
		{Dir("a", 0o755), x, Hardlink("b", "a/x"), Symlink("s", "a/x"), CharDev("c", 1, 3), Fifo("f"), Reg("a/gone", 0o644, nil), Dir("o", 0o700), Reg("o/old", 0o644, nil)},
		{Whiteout("a/gone"), Opaque("o"), Reg("o/new", 0o644, []byte("n"))},
	}}
	lay := BuildAndPush(t, filepath.Join(dir, "img"), reg.Host+"/rich:v1", PushOptions{}, img)
	cd := StartContainerd(t, ContainerdOptions{Dir: filepath.Join(dir, "cd")})
	cl := cd.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var diffIDs []digest.Digest
	for _, l := range lay.Images[0].Layers {
		diffIDs = append(diffIDs, l.DiffID)
	}
	trees := map[string]map[string]Node{}
	for _, sn := range []string{"overlayfs", "native"} {
		if _, err := PullUnpacked(ctx, cl, "ns-"+sn, reg.Host+"/rich:v1", sn); err != nil {
			t.Fatal(err)
		}
		mp := filepath.Join(dir, "view-"+sn)
		undo := MountView(t, ctx, cl, "ns-"+sn, sn, ChainID(diffIDs), mp)
		tree, err := ReadTree(mp)
		undo()
		if err != nil {
			t.Fatal(err)
		}
		trees[sn] = tree
	}
	if d := DiffTrees(trees["overlayfs"], trees["native"]); len(d) > 0 {
		t.Fatalf("trees differ:\n%s", strings.Join(d, "\n"))
	}
	ov := trees["overlayfs"]
	for p, want := range map[string]string{"a/gone": "", "o/old": "", "o/new": "reg", "b": "reg", "c": "char", "f": "fifo", "s": "symlink"} {
		if got := ov[p].Type; got != want {
			t.Errorf("%s: type %q, want %q", p, got, want)
		}
	}
	if ov["b"].LinkGroup != "a/x" || ov["a/x"].Xattrs["user.k"] != "v" || ov["a/x"].Perm != 0o4750 || ov["a/x"].UID != 7 {
		t.Errorf("a/x and b: %s / %s", ov["a/x"], ov["b"])
	}
}
