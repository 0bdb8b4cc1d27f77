package fs_test

import (
	"archive/tar"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/fs"
)

func overlayLayers() (lower, upper []tarEntry) {
	lower = []tarEntry{
		dir("a/", 0o755, 0),
		reg("a/file1", 0o644, []byte("lower1"), 1),
		reg("a/file2", 0o644, []byte("lower2"), 1),
		dir("b/", 0o755, 2),
		reg("b/x", 0o644, []byte("x"), 3),
		reg("b/y", 0o644, []byte("y"), 3),
		reg("c", 0o644, []byte("lower c"), 4),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "d/hard", Linkname: "c", ModTime: mtime(5)}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "s", Linkname: "a/file2", Mode: 0o777, ModTime: mtime(5)}},
		{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mtime(6)}},
		reg("big", 0o644, randomBytes(7, 3*testChunkSize+5), 7),
	}
	upper = []tarEntry{
		dir("a/", 0o755, 10),
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "a/.wh.file1", ModTime: mtime(11)}},
		dir("b/", 0o755, 12),
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "b/.wh..wh..opq", ModTime: mtime(12)}},
		reg("b/z", 0o644, []byte("z"), 13),
		reg("c", 0o644, []byte("upper c"), 14),
		reg("f", 0o644, []byte("fff"), 15),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "e/h", Linkname: "f", ModTime: mtime(15)}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: ".wh.s", ModTime: mtime(16)}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "bin/sudo", Mode: 0o4755, ModTime: mtime(17),
			PAXRecords: map[string]string{"SCHILY.xattr.security.capability": string(capability)}}, data: []byte("sudo")},
	}
	return lower, upper
}

// describe walks root and describes every name below it.
func describe(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := strings.TrimPrefix(p, root+"/")
		if p == root {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			out[rel] = "dir"
		case unix.S_IFREG:
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[rel] = fmt.Sprintf("file %o %x", st.Mode&0o7777, sha256.Sum256(data))
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			out[rel] = "symlink " + target
		case unix.S_IFCHR:
			out[rel] = fmt.Sprintf("char %d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		default:
			out[rel] = fmt.Sprintf("mode %o", st.Mode)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", root, err)
	}
	return out
}

func fileDesc(mode int64, data []byte) string {
	return fmt.Sprintf("file %o %x", mode, sha256.Sum256(data))
}

// mountOverlay mounts an overlay of lowers (topmost first), with an upper
// directory when upper is set, and unmounts it when the test ends.
func mountOverlay(t *testing.T, upper, work string, lowers ...string) string {
	t.Helper()
	merged := filepath.Join(t.TempDir(), "merged")
	if err := os.Mkdir(merged, 0o755); err != nil {
		t.Fatal(err)
	}
	opts := "lowerdir=" + strings.Join(lowers, ":")
	if upper != "" {
		opts += ",upperdir=" + upper + ",workdir=" + work
	}
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		if errors.Is(err, unix.ENODEV) {
			t.Skipf("SKIP LOUDLY: this kernel has no overlayfs: %v", err)
		}
		t.Fatalf("mount overlay %s: %v", opts, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, 0); err != nil {
			t.Errorf("unmount overlay: %v", err)
			unix.Unmount(merged, unix.MNT_DETACH)
		}
	})
	return merged
}

func TestOverlayLowerLayers(t *testing.T) {
	lowerEntries, upperEntries := overlayLayers()
	lower := buildLayer(t, makeTar(t, lowerEntries), testChunkSize)
	upper := buildLayer(t, makeTar(t, upperEntries), testChunkSize)
	lowerMnt, _ := mountLayer(t, lower.toc, &memReader{blob: lower.blob}, fs.Options{})
	upperMnt, _ := mountLayer(t, upper.toc, &memReader{blob: upper.blob}, fs.Options{})

	want := map[string]string{
		"a":        "dir",
		"a/file2":  fileDesc(0o644, []byte("lower2")),
		"b":        "dir",
		"b/z":      fileDesc(0o644, []byte("z")),
		"c":        fileDesc(0o644, []byte("upper c")),
		"d":        "dir",
		"d/hard":   fileDesc(0o644, []byte("lower c")),
		"dev":      "dir",
		"dev/null": "char 1:3",
		"big":      fileDesc(0o644, randomBytes(7, 3*testChunkSize+5)),
		"e":        "dir",
		"e/h":      fileDesc(0o644, []byte("fff")),
		"f":        fileDesc(0o644, []byte("fff")),
		"bin":      "dir",
		"bin/sudo": fileDesc(0o4755, []byte("sudo")),
	}
	check := func(t *testing.T, merged string, want map[string]string) {
		t.Helper()
		got := describe(t, merged)
		var names []string
		for k := range got {
			names = append(names, k)
		}
		for k := range want {
			if _, ok := got[k]; !ok {
				names = append(names, k)
			}
		}
		sort.Strings(names)
		for _, k := range names {
			if got[k] != want[k] {
				t.Errorf("merged %q: %q, want %q", k, got[k], want[k])
			}
		}
		buf := make([]byte, 64)
		if n, err := unix.Lgetxattr(filepath.Join(merged, "bin/sudo"), "security.capability", buf); err != nil || string(buf[:n]) != string(capability) {
			t.Errorf("security.capability through overlay: %x, %v", buf[:max(n, 0)], err)
		}
	}

	t.Run("read-only stack", func(t *testing.T) {
		merged := mountOverlay(t, "", "", upperMnt, lowerMnt)
		check(t, merged, want)
		var e, f unix.Stat_t
		if unix.Lstat(filepath.Join(merged, "e/h"), &e) != nil || unix.Lstat(filepath.Join(merged, "f"), &f) != nil ||
			e.Ino != f.Ino || e.Dev != f.Dev {
			t.Errorf("hardlink e/h (ino %d dev %d) and f (ino %d dev %d) are not one file through overlay", e.Ino, e.Dev, f.Ino, f.Dev)
		}
	})

	t.Run("container rootfs with an upper dir", func(t *testing.T) {
		// The upper directory lives on a tmpfs of our own: the test temp
		// directory may itself be on overlayfs, which cannot be an upper.
		scratch := filepath.Join(t.TempDir(), "scratch")
		if err := os.Mkdir(scratch, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", scratch, "tmpfs", 0, "size=64m"); err != nil {
			t.Fatalf("mount tmpfs: %v", err)
		}
		t.Cleanup(func() {
			if err := unix.Unmount(scratch, 0); err != nil {
				t.Errorf("unmount tmpfs: %v", err)
				unix.Unmount(scratch, unix.MNT_DETACH)
			}
		})
		up, work := filepath.Join(scratch, "upper"), filepath.Join(scratch, "work")
		for _, d := range []string{up, work} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		merged := mountOverlay(t, up, work, upperMnt, lowerMnt)
		if err := os.WriteFile(filepath.Join(merged, "new"), []byte("new"), 0o600); err != nil {
			t.Fatalf("write new file: %v", err)
		}
		if err := os.Remove(filepath.Join(merged, "a/file2")); err != nil {
			t.Fatalf("remove a lower file: %v", err)
		}
		// Appending copies the big file up from the FUSE layer first.
		f, err := os.OpenFile(filepath.Join(merged, "big"), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatalf("open lower file for append: %v", err)
		}
		if _, err := f.Write([]byte("tail")); err != nil {
			t.Fatalf("append: %v", err)
		}
		f.Close()
		// chmod copies bin/sudo up with its xattrs.
		if err := unix.Chmod(filepath.Join(merged, "bin/sudo"), 0o4755); err != nil {
			t.Fatalf("chmod: %v", err)
		}
		w := map[string]string{}
		for k, v := range want {
			w[k] = v
		}
		delete(w, "a/file2")
		w["new"] = fileDesc(0o600, []byte("new"))
		w["big"] = fileDesc(0o644, append(randomBytes(7, 3*testChunkSize+5), "tail"...))
		check(t, merged, w)
		if _, err := os.Stat(filepath.Join(up, "bin/sudo")); err != nil {
			t.Errorf("bin/sudo was not copied up: %v", err)
		}
	})
}
