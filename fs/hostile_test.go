package fs_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
	stfs "github.com/streamer-dev/streamer/fs"
	"github.com/streamer-dev/streamer/internal/testenv"
)

// marshalTOC encodes a TOC as the converter would, without validating it.
func marshalTOC(t *testing.T, toc *artifact.TOC) []byte {
	t.Helper()
	b, _, err := toc.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// zstdBytes compresses b into one zstd frame.
func zstdBytes(t *testing.T, parts ...[]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, err := zstd.NewWriter(&buf, zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range parts {
		zw.Write(p)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// treeSnapshot lists every path under dir with its size, skipping skip.
func treeSnapshot(t *testing.T, dir, skip string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return nil
		}
		if p == skip {
			return filepath.SkipDir
		}
		out[p] = info.Size()
		return nil
	})
	return out
}

// TestHostileArtifacts pushes streaming artifacts crafted to attack a node
// and mounts them: each is refused at mount time with an error wrapping
// ErrNotStreamable that says why (the snapshotter then pulls the layer
// normally), and nothing outside the Manager's root is written.
func TestHostileArtifacts(t *testing.T) {
	e := newFaultEnv(t, testenv.RegistryOptions{}, fetcher.Credential{})
	victim := filepath.Join(os.TempDir(), fmt.Sprintf("streamer-pwned-%d", time.Now().UnixNano()))
	rel := strings.Repeat("../", 16) + strings.TrimPrefix(victim, "/")
	good := makeTar(t, []tarEntry{
		dir("app/", 0o755, 1),
		reg("app/a.bin", 0o644, randomBytes(51, 100<<10), 2),
		reg("app/b.bin", 0o644, randomBytes(52, 100<<10), 2),
	})
	entry := func(l *testLayer, name string) *artifact.Entry {
		for i := range l.toc.Entries {
			if l.toc.Entries[i].Name == name {
				return &l.toc.Entries[i]
			}
		}
		t.Fatalf("no entry %s", name)
		return nil
	}
	// alter returns a craft func that changes the honest TOC.
	alter := func(f func(l *testLayer)) func(*testLayer, digest.Digest) []byte {
		return func(l *testLayer, _ digest.Digest) []byte {
			f(l)
			return marshalTOC(t, l.toc)
		}
	}
	for i, tc := range []struct {
		name  string
		craft func(*testLayer, digest.Digest) []byte
		want  string // in the error
	}{
		{"dot-dot name", alter(func(l *testLayer) { entry(l, "app/a.bin").Name = rel }), "escapes the layer root"},
		{"dot-dot inside name", alter(func(l *testLayer) { entry(l, "app/a.bin").Name = "app/../../x" }), "escapes the layer root"},
		{"absolute name", alter(func(l *testLayer) { entry(l, "app/a.bin").Name = victim }), "absolute"},
		{"NUL in name", alter(func(l *testLayer) { entry(l, "app/a.bin").Name = "app/a\x00.bin" }), "NUL"},
		{"hardlink to a missing entry", alter(func(l *testLayer) {
			l.toc.Entries = append(l.toc.Entries, artifact.Entry{Name: "app/link", Type: artifact.TypeHardlink, Linkname: "app/missing", ModTime: mtime(1)})
		}), "not an earlier entry"},
		{"hardlink to a later entry", alter(func(l *testLayer) {
			b := *entry(l, "app/b.bin")
			link := artifact.Entry{Name: "app/early-link", Type: artifact.TypeHardlink, Linkname: "app/b.bin", Size: b.Size, ModTime: mtime(1)}
			l.toc.Entries = append([]artifact.Entry{l.toc.Entries[0], link}, l.toc.Entries[1:]...)
		}), "not an earlier entry"},
		{"hardlink out of the root", alter(func(l *testLayer) {
			l.toc.Entries = append(l.toc.Entries, artifact.Entry{Name: "app/link", Type: artifact.TypeHardlink, Linkname: rel, ModTime: mtime(1)})
		}), "not an earlier entry"},
		{"overlapping chunks", alter(func(l *testLayer) { l.toc.Chunks[1].CompressedOffset = l.toc.Chunks[0].CompressedOffset }), "compressed offset"},
		{"chunk past the blob", alter(func(l *testLayer) {
			last := &l.toc.Chunks[len(l.toc.Chunks)-1]
			last.CompressedSize += 16
			l.toc.BlobSize += 16
		}), "the blob size is"},
		{"chunk past the tar", alter(func(l *testLayer) { l.toc.Chunks[len(l.toc.Chunks)-1].Size += 1 << 30 }), "size"},
		{"absurd tar size", alter(func(l *testLayer) { l.toc.TarSize = 1 << 62 }), "tar size"},
		{"TOC of another layer", alter(func(l *testLayer) { l.toc.Layer = digest.FromString("another layer") }), "names layer"},
		{"a billion entries claimed", func(l *testLayer, layer digest.Digest) []byte {
			// The decoder counts while it reads: past its limit it stops,
			// long before a billion entries could be held in memory.
			head := fmt.Sprintf(`{"version":1,"layer":%q,"diffID":%q,"tarSize":1000000000000,"blobSize":1,"chunkSize":65536,"entries":[`, layer, layer)
			return zstdBytes(t, []byte(head), bytes.Repeat([]byte(`{},`), artifact.DefaultLimits.MaxEntries+1), []byte(`{}]}`))
		}, "entries"},
		{"zstd bomb", func(l *testLayer, layer digest.Digest) []byte {
			// 1 GiB of blanks in a few tens of KiB: the decoder stops at
			// its byte limit.
			blank := bytes.Repeat([]byte(" "), 1<<20)
			parts := [][]byte{[]byte(`{"entries":`)}
			for i := 0; i < 1024; i++ {
				parts = append(parts, blank)
			}
			return zstdBytes(t, parts...)
		}, "larger than"},
		{"not zstd", func(*testLayer, digest.Digest) []byte { return []byte(`{"version":1}`) }, "magic number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := pushCrafted(t, e.client, e.proxy.Host, fmt.Sprintf("test/hostile-%d", i), good, good, tc.craft)
			base := t.TempDir()
			root := filepath.Join(base, "root")
			n, _ := startNode(t, e.client, root)
			mnt := filepath.Join(base, "mnt")
			if err := os.Mkdir(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			before := treeSnapshot(t, base, root)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			start := time.Now()
			err := n.m.Mount(ctx, mnt, img.labels())
			took := time.Since(start)
			if err == nil {
				n.m.Unmount(context.Background(), mnt)
				t.Fatalf("Mount of a hostile artifact succeeded; want ErrNotStreamable (%s)", tc.want)
			}
			if !errors.Is(err, stfs.ErrNotStreamable) {
				t.Errorf("Mount: %v; want ErrNotStreamable (fallback to a normal pull)", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Mount error %q does not say %q", err, tc.want)
			}
			if _, err := os.Lstat(victim); err == nil {
				t.Errorf("%s was created outside the root", victim)
			}
			after := treeSnapshot(t, base, root)
			for p := range after {
				if _, ok := before[p]; !ok {
					t.Errorf("Mount created %s outside its root", p)
				}
			}
			if s := n.m.Stats(); s.Fallbacks != 1 || s.Mounted != 0 {
				t.Errorf("stats %+v: want one fallback, nothing mounted", s)
			}
			t.Logf("refused in %v: %v", took.Round(time.Millisecond), err)
		})
	}
}

func tarHeaderSymlink(name, target string) tar.Header {
	return tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: mtime(1)}
}

// TestHostileSymlinkOutOfRoot: a symlink may point anywhere, as in any tar
// layer; the filesystem serves it as a link and never follows it. Inside a
// container the kernel resolves it against the container's root (overlay
// over the layers), never the host's.
func TestHostileSymlinkOutOfRoot(t *testing.T) {
	e := newFaultEnv(t, testenv.RegistryOptions{}, fetcher.Credential{})
	tarBytes := makeTar(t, []tarEntry{
		dir("etc/", 0o755, 1),
		{hdr: tarHeaderSymlink("etc/shadow-link", "/etc/shadow")},
		{hdr: tarHeaderSymlink("etc/up", "../../../../../../../../etc/passwd")},
	})
	img := pushCrafted(t, e.client, e.proxy.Host, "test/symlinks", tarBytes, tarBytes, nil)
	n, _ := startNode(t, e.client, t.TempDir())
	dir := managerMount(t, n.m, img.labels())
	for name, target := range map[string]string{"etc/shadow-link": "/etc/shadow", "etc/up": "../../../../../../../../etc/passwd"} {
		got, err := os.Readlink(filepath.Join(dir, name))
		if err != nil || got != target {
			t.Errorf("readlink %s = %q, %v; want %q served verbatim", name, got, err, target)
		}
		fi, err := os.Lstat(filepath.Join(dir, name))
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Errorf("lstat %s: %v, %v; want a symlink", name, fi, err)
		}
	}
}

// TestArtifactContentMismatch: a streaming artifact whose files differ
// from the image it names as subject. Before completion nothing can tell
// (the chunks verify against the attacker's TOC); when the layer completes
// its tar is checked against the diffID, the layer is marked bad and its
// next mount falls back to a normal pull.
func TestArtifactContentMismatch(t *testing.T) {
	e := newFaultEnv(t, testenv.RegistryOptions{}, fetcher.Credential{})
	imageTar := makeTar(t, []tarEntry{reg("app/motd", 0o644, []byte("the real image\n"), 1)})
	evilTar := makeTar(t, []tarEntry{reg("app/motd", 0o644, []byte("an impostor layer\n"), 1)})

	for _, tc := range []struct {
		name   string
		diffID func(layer digest.Digest) digest.Digest // what the forged TOC claims
		// refused: the TOC's diffID does not give the chain id containerd
		// asks for (derived from the image config), so the mount is refused
		// before any byte is served.
		refused bool
	}{
		// The TOC claims the image's diffID, but its chunks rebuild another tar.
		{"TOC claims the image's diffID", func(layer digest.Digest) digest.Digest { return layer }, false},
		// The TOC is consistent with its own chunks and claims their digest.
		{"TOC consistent with itself", func(digest.Digest) digest.Digest { return digest.FromBytes(evilTar) }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			repo := "test/mismatch-" + strings.ReplaceAll(strings.ToLower(tc.name[:9]), " ", "-")
			img := pushCrafted(t, e.client, e.proxy.Host, repo, imageTar, evilTar, func(l *testLayer, layer digest.Digest) []byte {
				l.toc.DiffID = tc.diffID(layer)
				return marshalTOC(t, l.toc)
			})
			root := t.TempDir()
			n, stop := startNode(t, e.client, root, func(o *stfs.ManagerOptions) { o.Background = true })
			if tc.refused {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				mnt := t.TempDir()
				if err := n.m.Mount(ctx, mnt, img.labels()); !errors.Is(err, stfs.ErrNotStreamable) {
					if err == nil {
						n.m.Unmount(context.Background(), mnt)
					}
					t.Fatalf("mount of a TOC bound to another diffID: %v; want ErrNotStreamable", err)
				}
				return
			}
			dir := managerMount(t, n.m, img.labels())
			// Before completion: the impostor's bytes, verified against its own TOC.
			got, err := readChild(t, filepath.Join(dir, "app/motd"), 10*time.Second)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			t.Logf("before completion the mount serves %q", got)
			deadline := time.Now().Add(10 * time.Second)
			for n.m.Stats().LayersBad == 0 && n.m.Stats().LayersComplete == 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			s := n.m.Stats()
			if s.LayersBad != 1 {
				t.Fatalf("after the background fetch: %d layers bad, %d complete; want the impostor layer detected as bad", s.LayersBad, s.LayersComplete)
			}
			if !strings.Contains(n.logs.String(), "LAYER FAILED VERIFICATION") {
				t.Errorf("no error log for the bad layer:\n%s", n.logs)
			}
			stop()
			n2, _ := startNode(t, e.client, root)
			mnt := t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := n2.m.Mount(ctx, mnt, img.labels()); !errors.Is(err, stfs.ErrNotStreamable) {
				if err == nil {
					n2.m.Unmount(context.Background(), mnt)
				}
				t.Fatalf("mount after the layer failed verification: %v; want ErrNotStreamable", err)
			}
		})
	}
}
