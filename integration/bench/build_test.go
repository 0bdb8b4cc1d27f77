package bench

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

type entry struct {
	typ  byte
	link string
	size int64
}

func readTar(t *testing.T, raw []byte) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	tr := tar.NewReader(bytes.NewReader(raw))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = entry{typ: h.Typeflag, link: h.Linkname, size: h.Size}
	}
}

func TestWriteTree(t *testing.T) {
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755))
	must(os.WriteFile(filepath.Join(root, "usr/bin/tool"), []byte("binary"), 0o755))
	must(os.Link(filepath.Join(root, "usr/bin/tool"), filepath.Join(root, "usr/bin/tool2")))
	must(os.Symlink("tool", filepath.Join(root, "usr/bin/alias")))
	must(os.MkdirAll(filepath.Join(root, "proc/self"), 0o755))
	must(os.WriteFile(filepath.Join(root, "proc/self/x"), []byte("never"), 0o644))
	must(os.MkdirAll(filepath.Join(root, "var/lib/apt/lists"), 0o755))
	must(os.WriteFile(filepath.Join(root, "var/lib/apt/lists/deb.debian.org_Packages"), []byte("lists"), 0o644))
	whiteout := os.Geteuid() == 0
	if whiteout {
		// An overlay whiteout: a 0/0 character device.
		must(unix.Mknod(filepath.Join(root, "usr/bin/gone"), unix.S_IFCHR|0o644, 0))
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	must(writeTree(tw, root))
	must(tw.Close())
	got := readTar(t, buf.Bytes())

	want := map[string]entry{
		"usr/":               {typ: tar.TypeDir},
		"usr/bin/":           {typ: tar.TypeDir},
		"usr/bin/alias":      {typ: tar.TypeSymlink, link: "tool"},
		"usr/bin/tool":       {typ: tar.TypeReg, size: 6},
		"usr/bin/tool2":      {typ: tar.TypeLink, link: "usr/bin/tool"},
		"proc/":              {typ: tar.TypeDir},
		"var/":               {typ: tar.TypeDir},
		"var/lib/":           {typ: tar.TypeDir},
		"var/lib/apt/":       {typ: tar.TypeDir},
		"var/lib/apt/lists/": {typ: tar.TypeDir},
	}
	if whiteout {
		want["usr/bin/.wh.gone"] = entry{typ: tar.TypeReg}
	}
	var names []string
	for n := range got {
		names = append(names, n)
	}
	sort.Strings(names)
	if len(got) != len(want) {
		t.Errorf("layer has %v, want %d entries", names, len(want))
	}
	for n, w := range want {
		if g, ok := got[n]; !ok || g != w {
			t.Errorf("%s: got %+v (present %v), want %+v", n, g, ok, w)
		}
	}
	for _, n := range names {
		if strings.HasPrefix(n, "proc/self") || strings.Contains(n, "Packages") {
			t.Errorf("skipped content %s is in the layer", n)
		}
	}
}

func TestWriteDataFiles(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := writeDataFiles(context.Background(), tw, 4096+1000, 4096); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	got := readTar(t, buf.Bytes())
	if got["data/blob-000.bin"].size != 4096 || got["data/blob-001.bin"].size != 1000 || len(got) != 3 {
		t.Fatalf("data layer: %+v", got)
	}
}

func TestLayoutWriter(t *testing.T) {
	dir := t.TempDir()
	lw, err := newLayoutWriter(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"base", "app"} {
		if err := lw.addLayer(name, func(tw *tar.Writer) error {
			return writeFiles(tw, map[string]string{"app/" + name + ".txt": name, "app/sub/x": "y"})
		}); err != nil {
			t.Fatal(err)
		}
	}
	r := QuickRecipe()
	built, err := lw.finish("v1", r)
	if err != nil {
		t.Fatal(err)
	}
	if len(built.Layers) != 2 || built.Layers[0].Name != "base" || built.Size != built.Layers[0].Size+built.Layers[1].Size {
		t.Fatalf("built %+v", built)
	}
	for _, l := range built.Layers {
		data, err := os.ReadFile(filepath.Join(dir, "blobs", "sha256", l.Digest.Encoded()))
		if err != nil || int64(len(data)) != l.Size {
			t.Fatalf("layer blob %s: %d bytes, %v", l.Digest, len(data), err)
		}
	}
	if built.Ref() != "oci:"+dir+":v1" {
		t.Fatalf("Ref = %s", built.Ref())
	}
	idx, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil || !strings.Contains(string(idx), built.Manifest.String()) || !strings.Contains(string(idx), `"org.opencontainers.image.ref.name":"v1"`) {
		t.Fatalf("index.json %s, %v", idx, err)
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, "blobs", "sha256", ".layer-*"))
	if len(leftovers) != 0 {
		t.Fatalf("temporary blobs left: %v", leftovers)
	}
}
