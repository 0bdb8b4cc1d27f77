package fs_test

import (
	"archive/tar"
	"path/filepath"
	"slices"
	"testing"
	"time"

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
	if !ok || !slices.Equal(got, want) {
		t.Fatalf("profile %q (found %v), want %q", got, ok, want)
	}
	if imgs := m.ProfiledImages(); !slices.Equal(imgs, []string{img.ref}) {
		t.Errorf("profiled images %q, want [%s]", imgs, img.ref)
	}

	time.Sleep(time.Until(start.Add(window + 100*time.Millisecond)))
	if _, err := readWithin(t, filepath.Join(mnt, "app/late.bin"), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got, _ := m.Profile(img.ref); !slices.Equal(got, want) {
		t.Errorf("a read after the window was recorded: %q", got)
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
		t.Errorf("profile %q with recording off", got)
	}
}
