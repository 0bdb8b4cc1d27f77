package fs_test

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/posixtest"
	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/fs"
)

const testChunkSize = 64 << 10 // artifact.MinChunkSize: many chunks from small files

// randomBytes returns n deterministic pseudo-random bytes.
func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

var (
	baseTime = time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)
	// capability is a security.capability value (v2, cap_net_raw).
	capability = []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	longName   = "deep/" + strings.Repeat("long-name-", 15) + "end.txt"
	longTarget = "/" + strings.Repeat("target/", 20) + "file"
	bigSize    = 5*testChunkSize + 12345
)

func mtime(i int) time.Time { return baseTime.Add(time.Duration(i) * time.Hour) }

func dir(name string, mode int64, i int) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: mtime(i)}}
}

func reg(name string, mode int64, data []byte, i int) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, ModTime: mtime(i)}, data: data}
}

// richEntries is a layer with every kind of entry.
func richEntries() []tarEntry {
	e := []tarEntry{
		dir("./", 0o755, 0),
		dir("bin/", 0o755, 1),
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "bin/sudo", Mode: 0o4755, ModTime: mtime(2),
			PAXRecords: map[string]string{"SCHILY.xattr.security.capability": string(capability)}}, data: []byte("#!/bin/sh\necho sudo\n")},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/sh", Linkname: "busybox", Mode: 0o777, ModTime: mtime(3)}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/long-link", Linkname: longTarget, Mode: 0o777, ModTime: mtime(3)}},
		dir("etc/", 0o755, 4),
		reg("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"), 5),
		reg("etc/empty", 0o600, nil, 6),
		reg("etc/shadow", 0, []byte("root:*:19000:0:99999:7:::\n"), 6),
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "etc/.wh.removed", Mode: 0o644, ModTime: mtime(7)}},
		dir("data/", 0o755, 8),
		reg("data/big.bin", 0o644, randomBytes(1, bigSize), 9),
		reg("data/exact-chunk.bin", 0o644, randomBytes(2, testChunkSize), 10),
		dir("links/", 0o755, 11),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "links/passwd", Linkname: "etc/passwd", ModTime: mtime(12)}},
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "links/big", Linkname: "./data/big.bin", ModTime: mtime(12)}},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "home/user/", Mode: 0o700, Uid: 1000, Gid: 1001, Uname: "user", Gname: "users", ModTime: mtime(13)}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "home/user/notes", Mode: 0o640, Uid: 1000, Gid: 1001, ModTime: mtime(14),
			PAXRecords: map[string]string{"SCHILY.xattr.user.note": "hello", "SCHILY.xattr.user.empty": ""}}, data: []byte("notes\n")},
		dir("dev/", 0o755, 15),
		{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mtime(16)}},
		{hdr: tar.Header{Typeflag: tar.TypeBlock, Name: "dev/sda", Mode: 0o660, Gid: 6, Devmajor: 8, Devminor: 0, ModTime: mtime(16)}},
		{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/big", Mode: 0o600, Devmajor: 300, Devminor: 70000, ModTime: mtime(16)}},
		{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "run/fifo", Mode: 0o620, ModTime: mtime(17)}},
		dir("tmp/", 0o1777, 18),
		dir("var/cache/", 0o755, 19),
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "var/cache/.wh..wh..opq", ModTime: mtime(20)}},
		reg("var/cache/keep", 0o644, []byte("kept\n"), 21),
		reg(longName, 0o644, []byte("long\n"), 22),
		// AUFS metadata: ignored.
		dir(".wh..wh.plnk/", 0o700, 22),
		reg(".wh..wh.plnk/123.456", 0o644, []byte("aufs"), 22),
	}
	for i := range 300 {
		e = append(e, reg(fmt.Sprintf("many/file-%04d", i), 0o644, []byte(fmt.Sprintf("file %d\n", i)), 23))
	}
	return e
}

// model is what a layer's tree should look like, derived from its tar by
// the rules of the package documentation.
type model struct {
	nodes    map[string]*modelNode // by clean path; "" is the root
	children map[string][]string   // directory path -> names
}

type modelNode struct {
	hdr      *tar.Header // nil for implied directories
	data     []byte
	kind     uint32
	whiteout bool
	opaque   bool
	linkTo   string // hardlinks: the path of the target
	nlink    int
}

func cleanTarName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

func buildModel(t *testing.T, tarBytes []byte) *model {
	t.Helper()
	m := &model{nodes: map[string]*modelNode{"": {kind: syscall.S_IFDIR}}, children: map[string][]string{}}
	add := func(p string, n *modelNode) {
		if _, ok := m.nodes[p]; !ok {
			d, b := path.Split(p)
			d = strings.TrimSuffix(d, "/")
			m.children[d] = append(m.children[d], b)
		}
		m.nodes[p] = n
	}
	var ensure func(p string)
	ensure = func(p string) {
		if _, ok := m.nodes[p]; ok || p == "" {
			return
		}
		ensure(strings.TrimSuffix(path.Dir(p), "."))
		add(p, &modelNode{kind: syscall.S_IFDIR})
	}
	tr := tar.NewReader(bytes.NewReader(tarBytes))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read tar: %v", err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		p := cleanTarName(h.Name)
		if p == "" {
			// The converter keeps no TOC entry for "./", so the root
			// looks implied; a TOC "." entry is tested in
			// TestRootEntry.
			continue
		}
		parent, base := strings.TrimSuffix(path.Dir(p), "."), path.Base(p)
		if strings.HasPrefix(p, ".wh..wh.") && base != ".wh..wh..opq" {
			continue // AUFS metadata
		}
		ensure(parent)
		switch {
		case base == ".wh..wh..opq":
			m.nodes[parent].opaque = true
		case strings.HasPrefix(base, ".wh."):
			add(path.Join(parent, strings.TrimPrefix(base, ".wh.")), &modelNode{hdr: h, kind: syscall.S_IFCHR, whiteout: true})
		default:
			n := &modelNode{hdr: h, data: data}
			switch h.Typeflag {
			case tar.TypeDir:
				n.kind = syscall.S_IFDIR
			case tar.TypeReg:
				n.kind = syscall.S_IFREG
			case tar.TypeLink:
				n.kind = syscall.S_IFREG
				n.linkTo = cleanTarName(h.Linkname)
				n.data = m.nodes[n.linkTo].data
				m.nodes[n.linkTo].nlink++
			case tar.TypeSymlink:
				n.kind = syscall.S_IFLNK
			case tar.TypeChar:
				n.kind = syscall.S_IFCHR
			case tar.TypeBlock:
				n.kind = syscall.S_IFBLK
			case tar.TypeFifo:
				n.kind = syscall.S_IFIFO
			}
			add(p, n)
		}
	}
	for p, n := range m.nodes {
		if n.linkTo != "" {
			continue
		}
		n.nlink++
		if n.kind == syscall.S_IFDIR {
			n.nlink = 2
			for _, c := range m.children[p] {
				if m.nodes[path.Join(p, c)].kind == syscall.S_IFDIR {
					n.nlink++
				}
			}
		}
	}
	for p, n := range m.nodes {
		if n.linkTo != "" {
			n.nlink = m.nodes[n.linkTo].nlink
		}
		_ = p
	}
	return m
}

// checkTree compares everything visible under mnt with the model of tarBytes.
func checkTree(t *testing.T, mnt string, tarBytes []byte) {
	t.Helper()
	m := buildModel(t, tarBytes)
	paths := make([]string, 0, len(m.nodes))
	for p := range m.nodes {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		n := m.nodes[p]
		full := filepath.Join(mnt, p)
		var st unix.Stat_t
		if err := unix.Lstat(full, &st); err != nil {
			t.Errorf("lstat %q: %v", p, err)
			continue
		}
		if got := st.Mode & unix.S_IFMT; got != n.kind {
			t.Errorf("%q: file type %o, want %o", p, got, n.kind)
		}
		wantPerm, wantUID, wantGID, wantTime := uint32(0o755), 0, 0, time.Time{}
		h := n.hdr
		if n.linkTo != "" {
			h = m.nodes[n.linkTo].hdr
		}
		if h != nil {
			wantPerm, wantUID, wantGID, wantTime = uint32(h.Mode&0o7777), h.Uid, h.Gid, h.ModTime
		}
		if n.whiteout {
			wantPerm = 0
		}
		if got := st.Mode & 0o7777; got != wantPerm {
			t.Errorf("%q: permissions %o, want %o", p, got, wantPerm)
		}
		if int(st.Uid) != wantUID || int(st.Gid) != wantGID {
			t.Errorf("%q: owner %d:%d, want %d:%d", p, st.Uid, st.Gid, wantUID, wantGID)
		}
		if !wantTime.IsZero() {
			for name, ts := range map[string]unix.Timespec{"mtime": st.Mtim, "atime": st.Atim, "ctime": st.Ctim} {
				if got := time.Unix(ts.Unix()); !got.Equal(wantTime) {
					t.Errorf("%q: %s %v, want %v", p, name, got, wantTime)
				}
			}
		}
		if int(st.Nlink) != n.nlink {
			t.Errorf("%q: nlink %d, want %d", p, st.Nlink, n.nlink)
		}
		switch {
		case n.whiteout:
			if st.Rdev != 0 {
				t.Errorf("%q: whiteout rdev %d, want 0", p, st.Rdev)
			}
			hidden := filepath.Join(filepath.Dir(full), ".wh."+filepath.Base(full))
			if err := unix.Lstat(hidden, &unix.Stat_t{}); !errors.Is(err, unix.ENOENT) {
				t.Errorf("%q: whiteout entry itself visible (lstat: %v)", p, err)
			}
		case n.kind == syscall.S_IFREG:
			if st.Size != int64(len(n.data)) {
				t.Errorf("%q: size %d, want %d", p, st.Size, len(n.data))
			}
			got, err := os.ReadFile(full)
			if err != nil {
				t.Errorf("read %q: %v", p, err)
			} else if sha256.Sum256(got) != sha256.Sum256(n.data) {
				t.Errorf("%q: content differs from the tar (%d bytes read, %d in tar)", p, len(got), len(n.data))
			}
			if n.linkTo != "" {
				var tst unix.Stat_t
				if err := unix.Lstat(filepath.Join(mnt, n.linkTo), &tst); err != nil || tst.Ino != st.Ino {
					t.Errorf("%q: hardlink inode %d, target %q inode %d (%v)", p, st.Ino, n.linkTo, tst.Ino, err)
				}
			}
		case n.kind == syscall.S_IFLNK:
			got, err := os.Readlink(full)
			if err != nil || got != h.Linkname {
				t.Errorf("readlink %q = %q, %v; want %q", p, got, err, h.Linkname)
			}
			if st.Size != int64(len(h.Linkname)) {
				t.Errorf("%q: symlink size %d, want %d", p, st.Size, len(h.Linkname))
			}
		case n.kind == syscall.S_IFCHR || n.kind == syscall.S_IFBLK:
			if want := unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor)); st.Rdev != want {
				t.Errorf("%q: rdev %d:%d, want %d:%d", p, unix.Major(st.Rdev), unix.Minor(st.Rdev), h.Devmajor, h.Devminor)
			}
		case n.kind == syscall.S_IFDIR:
			ents, err := os.ReadDir(full)
			if err != nil {
				t.Errorf("readdir %q: %v", p, err)
				break
			}
			var got []string
			for _, e := range ents {
				got = append(got, e.Name())
				if e.Type() != fileMode(m.nodes[path.Join(p, e.Name())]) {
					t.Errorf("readdir %q: %q has type %v", p, e.Name(), e.Type())
				}
			}
			want := append([]string(nil), m.children[p]...)
			sort.Strings(want)
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Errorf("readdir %q = %q, want %q", p, got, want)
			}
		}
		checkXattrs(t, full, n, h)
	}
}

func fileMode(n *modelNode) os.FileMode {
	if n == nil {
		return os.ModeIrregular
	}
	switch n.kind {
	case syscall.S_IFDIR:
		return os.ModeDir
	case syscall.S_IFLNK:
		return os.ModeSymlink
	case syscall.S_IFCHR:
		return os.ModeDevice | os.ModeCharDevice
	case syscall.S_IFBLK:
		return os.ModeDevice
	case syscall.S_IFIFO:
		return os.ModeNamedPipe
	}
	return 0
}

func checkXattrs(t *testing.T, full string, n *modelNode, h *tar.Header) {
	t.Helper()
	want := map[string]string{}
	if h != nil && !n.whiteout {
		for k, v := range h.PAXRecords {
			if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				want[name] = v
			}
		}
	}
	if n.opaque {
		want["trusted.overlay.opaque"] = "y"
	}
	got := map[string]string{}
	buf := make([]byte, 64<<10)
	sz, err := unix.Llistxattr(full, buf)
	if err != nil {
		t.Errorf("listxattr %s: %v", full, err)
		return
	}
	for _, name := range strings.Split(string(buf[:sz]), "\x00") {
		if name == "" {
			continue
		}
		vsz, err := unix.Lgetxattr(full, name, buf)
		if err != nil {
			t.Errorf("getxattr %s %s: %v", full, name, err)
			continue
		}
		got[name] = string(buf[:vsz])
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("%s: xattrs %q, want %q", full, got, want)
	}
	if _, err := unix.Lgetxattr(full, "user.absent", buf); !errors.Is(err, unix.ENODATA) {
		t.Errorf("%s: getxattr of an absent name: %v, want ENODATA", full, err)
	}
}

func TestTreeMatchesTar(t *testing.T) {
	tarBytes := makeTar(t, richEntries())
	l := buildLayer(t, tarBytes, testChunkSize)
	mnt, m := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{})
	checkTree(t, mnt, tarBytes)
	if s := m.Stats(); s.Reads == 0 || s.BytesServed == 0 || s.Errors != 0 {
		t.Errorf("stats after reading every file: %+v", s)
	}
	t.Run("posixtest/ReadDirConsistency", func(t *testing.T) {
		posixtest.ReadDirConsistency(t, filepath.Join(mnt, "many"))
	})
}

// TestSemantics states the mapping rules one by one, independently of the
// model checkTree derives.
func TestSemantics(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()), testChunkSize)
	mnt, _ := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{})
	tests := []struct {
		path       string
		mode       uint32 // full st_mode
		uid, gid   uint32
		nlink      uint64
		rdev       uint64
		xattr, val string
	}{
		{path: "", mode: unix.S_IFDIR | 0o755, nlink: 13},
		{path: "bin/sudo", mode: unix.S_IFREG | 0o4755, nlink: 1, xattr: "security.capability", val: string(capability)},
		{path: "tmp", mode: unix.S_IFDIR | 0o1777, nlink: 2},
		{path: "home", mode: unix.S_IFDIR | 0o755, nlink: 3}, // implied: 0755 root:root
		{path: "run", mode: unix.S_IFDIR | 0o755, nlink: 2},  // implied
		{path: "home/user", mode: unix.S_IFDIR | 0o700, uid: 1000, gid: 1001, nlink: 2},
		{path: "etc/removed", mode: unix.S_IFCHR, nlink: 1},        // whiteout
		{path: "etc/passwd", mode: unix.S_IFREG | 0o644, nlink: 2}, // + links/passwd
		{path: "links/big", mode: unix.S_IFREG | 0o644, nlink: 2},  // hardlink across dirs
		{path: "dev/null", mode: unix.S_IFCHR | 0o666, nlink: 1, rdev: unix.Mkdev(1, 3)},
		{path: "dev/sda", mode: unix.S_IFBLK | 0o660, gid: 6, nlink: 1, rdev: unix.Mkdev(8, 0)},
		{path: "dev/big", mode: unix.S_IFCHR | 0o600, nlink: 1, rdev: unix.Mkdev(300, 70000)},
		{path: "run/fifo", mode: unix.S_IFIFO | 0o620, nlink: 1},
		{path: "var/cache", mode: unix.S_IFDIR | 0o755, nlink: 2, xattr: "trusted.overlay.opaque", val: "y"},
		{path: longName, mode: unix.S_IFREG | 0o644, nlink: 1},
		{path: "home/user/notes", mode: unix.S_IFREG | 0o640, uid: 1000, gid: 1001, nlink: 1, xattr: "user.note", val: "hello"},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.path, "/", "_"), func(t *testing.T) {
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(mnt, tt.path), &st); err != nil {
				t.Fatal(err)
			}
			if st.Mode != tt.mode || st.Uid != tt.uid || st.Gid != tt.gid || uint64(st.Nlink) != tt.nlink || st.Rdev != tt.rdev {
				t.Errorf("mode %o uid %d gid %d nlink %d rdev %d; want %o %d %d %d %d",
					st.Mode, st.Uid, st.Gid, st.Nlink, st.Rdev, tt.mode, tt.uid, tt.gid, tt.nlink, tt.rdev)
			}
			if tt.xattr != "" {
				buf := make([]byte, 256)
				n, err := unix.Lgetxattr(filepath.Join(mnt, tt.path), tt.xattr, buf)
				if err != nil || string(buf[:n]) != tt.val {
					t.Errorf("xattr %s = %q, %v; want %q", tt.xattr, buf[:max(n, 0)], err, tt.val)
				}
			}
		})
	}
	for _, hidden := range []string{"etc/.wh.removed", "var/cache/.wh..wh..opq", ".wh..wh.plnk", "plnk"} {
		if _, err := os.Lstat(filepath.Join(mnt, hidden)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: visible (%v), want hidden", hidden, err)
		}
	}
}

func TestInodesComeFromTheTOC(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()), testChunkSize)
	inodes := func(mnt string) map[string]uint64 {
		out := map[string]uint64{}
		filepath.WalkDir(mnt, func(p string, d os.DirEntry, err error) error {
			if err != nil {
				t.Errorf("walk %s: %v", p, err)
				return nil
			}
			var st unix.Stat_t
			if err := unix.Lstat(p, &st); err != nil {
				t.Error(err)
			}
			out[strings.TrimPrefix(p, mnt)] = st.Ino
			return nil
		})
		return out
	}
	a, _ := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{})
	b, _ := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{})
	ia, ib := inodes(a), inodes(b)
	if len(ia) < 300 || fmt.Sprint(ia) != fmt.Sprint(ib) {
		t.Errorf("inode numbers differ between two mounts of one TOC (%d and %d names)", len(ia), len(ib))
	}
	seen := map[uint64]string{}
	for p, ino := range ia {
		if other, ok := seen[ino]; ok && !strings.HasPrefix(p, "/links/") && !strings.HasPrefix(other, "/links/") {
			t.Errorf("%s and %s share inode %d", p, other, ino)
		}
		seen[ino] = p
	}
}

func TestStatfsAndReadOnly(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()), testChunkSize)
	mnt, _ := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{})
	var sfs unix.Statfs_t
	if err := unix.Statfs(mnt, &sfs); err != nil {
		t.Fatal(err)
	}
	m := buildModel(t, l.tar)
	wantBlocks := uint64((l.toc.TarSize + 4095) / 4096)
	if sfs.Bsize != 4096 || sfs.Blocks != wantBlocks || sfs.Files != uint64(len(m.nodes)-1) || sfs.Namelen != 255 || sfs.Bfree != 0 {
		t.Errorf("statfs bsize %d blocks %d files %d namelen %d bfree %d; want 4096 %d %d 255 0",
			sfs.Bsize, sfs.Blocks, sfs.Files, sfs.Namelen, sfs.Bfree, wantBlocks, len(m.nodes)-1)
	}
	if sfs.Flags&unix.ST_RDONLY == 0 {
		t.Errorf("statfs flags %#x: not read-only", sfs.Flags)
	}
	writes := map[string]func() error{
		"open for writing": func() error {
			f, err := os.OpenFile(filepath.Join(mnt, "etc/passwd"), os.O_WRONLY, 0)
			if err == nil {
				f.Close()
			}
			return err
		},
		"create":   func() error { return os.WriteFile(filepath.Join(mnt, "new"), nil, 0o644) },
		"mkdir":    func() error { return os.Mkdir(filepath.Join(mnt, "newdir"), 0o755) },
		"remove":   func() error { return os.Remove(filepath.Join(mnt, "etc/passwd")) },
		"chmod":    func() error { return os.Chmod(filepath.Join(mnt, "etc/passwd"), 0o777) },
		"setxattr": func() error { return unix.Setxattr(filepath.Join(mnt, "etc/passwd"), "user.x", []byte("1"), 0) },
	}
	for name, w := range writes {
		if err := w(); !errors.Is(err, unix.EROFS) {
			t.Errorf("%s: %v, want EROFS", name, err)
		}
	}
}

func TestMountsShowInProcMounts(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()[:3]), testChunkSize)
	mnt, m := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{FSName: "streamer-test-layer"})
	data, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	var line string
	for _, ln := range strings.Split(string(data), "\n") {
		if f := strings.Fields(ln); len(f) > 3 && f[1] == mnt {
			line = ln
		}
	}
	f := strings.Fields(line)
	if len(f) < 4 || f[0] != "streamer-test-layer" || f[2] != "fuse.streamer" || !strings.Contains(","+f[3]+",", ",ro,") ||
		!strings.Contains(f[3], "allow_other") {
		t.Errorf("/proc/mounts line %q: want source streamer-test-layer, type fuse.streamer, ro, allow_other", line)
	}
	if m.Mountpoint() != mnt {
		t.Errorf("Mountpoint() = %q, want %q", m.Mountpoint(), mnt)
	}
}

func TestUnmount(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()[:3]), testChunkSize)
	t.Run("idempotent", func(t *testing.T) {
		mnt, m := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{})
		for i := range 3 {
			if err := m.Unmount(); err != nil {
				t.Fatalf("unmount #%d: %v", i+1, err)
			}
		}
		if left := mountsUnder(filepath.Dir(mnt)); len(left) != 0 {
			t.Errorf("still mounted: %v", left)
		}
	})
	t.Run("busy detaches lazily", func(t *testing.T) {
		mnt, m := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{})
		f, err := os.Open(filepath.Join(mnt, "bin/sudo"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		withTimeout(t, 30*time.Second, "unmount of a busy layer", func() error {
			if err := m.Unmount(); err != nil {
				t.Errorf("unmount busy: %v", err)
			}
			return nil
		})
		if left := mountsUnder(filepath.Dir(mnt)); len(left) != 0 {
			t.Errorf("still in the mount table: %v", left)
		}
		// The open file still reads: the detached filesystem serves it.
		got, err := io.ReadAll(f)
		if err != nil || !bytes.Contains(got, []byte("sudo")) {
			t.Errorf("read from the lazily detached layer: %q, %v", got, err)
		}
	})
}
