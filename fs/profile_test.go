package fs_test

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fs"
)

// TestManagerRecordsFirstReads: files read through a mount come back from
// the Manager's profile of the image in first-read order, once each, as
// absolute paths (a hardlink as the file holding the data); reads after
// the record window are not recorded.
func TestManagerRecordsFirstReads(t *testing.T) {
	e := newManagerEnv(t)
	entries := []tarEntry{dir("app/", 0o755, 1)}
	for i, name := range []string{"app/a.bin", "app/b.bin", "app/c.bin", "app/d.bin", "app/e.bin", "app/late.bin"} {
		entries = append(entries, reg(name, 0o644, randomBytes(uint64(60+i), 150<<10), 2))
	}
	entries = append(entries, reg("app/empty", 0o644, nil, 2),
		tarEntry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "app/link", Linkname: "app/c.bin", ModTime: mtime(3)}})
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/profile", makeTar(t, entries), true)

	const window = 3 * time.Second
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) {
		o.Background, o.Prefetch = false, false
		o.RecordWindow = window
	})
	start := time.Now()
	mnt := managerMount(t, m, img.labels())
	if _, ok := m.Profile(img.ref); ok {
		t.Fatalf("a profile before any read")
	}
	for _, name := range []string{"app/e.bin", "app/b.bin", "app/link", "app/e.bin", "app/empty", "app/d.bin", "app/b.bin"} {
		if _, err := readWithin(t, filepath.Join(mnt, name), 10*time.Second); err != nil {
			t.Fatalf("read %s: %v", name, err)
		}
	}
	want := []string{"/app/e.bin", "/app/b.bin", "/app/c.bin", "/app/d.bin"}
	if time.Since(start) >= window {
		t.Skipf("SKIP: reads took longer than the %v record window on this machine", window)
	}
	got, ok := m.Profile(img.ref)
	if !ok || !slices.Equal(profilePaths(got), want) {
		t.Fatalf("profile %v (found %v), want %q", got, ok, want)
	}
	for _, f := range got {
		if f.Ranges != nil {
			t.Errorf("%s read whole, profiled as ranges %v", f.Path, f.Ranges)
		}
	}
	if imgs := m.ProfiledImages(); !slices.Equal(imgs, []string{img.ref}) {
		t.Errorf("profiled images %q, want [%s]", imgs, img.ref)
	}

	time.Sleep(time.Until(start.Add(window + 100*time.Millisecond)))
	if _, err := readWithin(t, filepath.Join(mnt, "app/late.bin"), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got, _ := m.Profile(img.ref); !slices.Equal(profilePaths(got), want) {
		t.Errorf("a read after the window was recorded: %v", got)
	}
}

// TestManagerRecordsNothingWhenOff: without RecordWindow nothing is kept.
func TestManagerRecordsNothingWhenOff(t *testing.T) {
	e := newManagerEnv(t)
	want := files{"app/x.bin": randomBytes(70, 10<<10)}
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/noprofile", want.tar(t), true)
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) { o.Background, o.Prefetch = false, false })
	mnt := managerMount(t, m, img.labels())
	readAll(t, mnt, want)
	if got, ok := m.Profile(img.ref); ok {
		t.Errorf("profile %v with recording off", got)
	}
}

func profilePaths(fs []fs.ProfiledFile) []string {
	var out []string
	for _, f := range fs {
		out = append(out, f.Path)
	}
	return out
}

// TestManagerRecordsReadRanges: a large file read in two places is
// profiled with the ranges of the chunks those reads needed, in file
// offsets, not as the whole file.
func TestManagerRecordsReadRanges(t *testing.T) {
	e := newManagerEnv(t)
	const size = 96 * testChunkSize // 6 MiB: the kernel reads ahead up to 1 MiB of each read
	big := randomBytes(80, size)
	entries := []tarEntry{dir("lib/", 0o755, 1), reg("lib/modules", 0o644, big, 2), reg("lib/small", 0o644, randomBytes(81, 1000), 2)}
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/ranges", makeTar(t, entries), true)
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) {
		o.Background, o.Prefetch = false, false
		o.RecordWindow = time.Minute
	})
	mnt := managerMount(t, m, img.labels())
	reads := []int64{3 * testChunkSize, 60*testChunkSize + 100}
	withTimeout(t, 30*time.Second, "pread lib/modules", func() error {
		f, err := os.Open(filepath.Join(mnt, "lib/modules"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		buf := make([]byte, 4096)
		for _, off := range reads {
			if _, err := f.ReadAt(buf, off); err != nil {
				t.Fatalf("pread at %d: %v", off, err)
			}
			if !bytes.Equal(buf, big[off:off+4096]) {
				t.Fatalf("pread at %d: wrong bytes", off)
			}
		}
		return nil
	})
	if _, err := readWithin(t, filepath.Join(mnt, "lib/small"), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	got, ok := m.Profile(img.ref)
	if !ok || !slices.Equal(profilePaths(got), []string{"/lib/modules", "/lib/small"}) {
		t.Fatalf("profile %v, want /lib/modules then /lib/small", got)
	}
	if got[1].Ranges != nil {
		t.Errorf("/lib/small read whole, profiled as %v", got[1].Ranges)
	}
	rs := got[0].Ranges
	var total int64
	for i, r := range rs {
		if r.Offset%testChunkSize != 0 || (r.End() != size && r.End()%testChunkSize != 0) {
			t.Errorf("range %v is not whole chunks of the file", r)
		}
		if i > 0 && r.Offset <= rs[i-1].End() {
			t.Errorf("ranges %v not sorted and merged", rs)
		}
		total += r.Size
	}
	for _, off := range reads {
		if !slices.ContainsFunc(rs, func(r artifact.Range) bool { return r.Offset <= off && off+4096 <= r.End() }) {
			t.Errorf("ranges %v do not hold the read at %d", rs, off)
		}
	}
	// The kernel reads ahead of a read, so more than the two chunks may
	// be read; not the file.
	if total == 0 || total > size/2 {
		t.Errorf("ranges %v hold %d of the file's %d bytes", rs, total, size)
	}
}
