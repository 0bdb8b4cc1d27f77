package fs_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/fs"
)

// TestPushListedFiles: a listed file of at least 1 MiB is written into the
// page cache when first opened, so that reading it whole, and touching
// every page of a mapping of it, costs no FUSE read and returns its bytes;
// small and unlisted files, and a mount without Push, are read through
// FUSE as usual.
func TestPushListedFiles(t *testing.T) {
	const libSize = 5<<20 + 1234 // not a whole number of pages
	lib := randomBytes(11, libSize)
	other := randomBytes(12, 3<<20)
	small := randomBytes(13, 100<<10)
	l := buildLayer(t, makeTar(t, []tarEntry{
		dir("lib/", 0o755, 0),
		reg("lib/libbig.so", 0o755, lib, 1),
		reg("lib/small.py", 0o644, small, 2),
		reg("lib/unlisted.so", 0o755, other, 3),
	}), testChunkSize)
	l.toc.Prefetch = []string{"lib/small.py", "lib/libbig.so"}

	for _, push := range []bool{true, false} {
		t.Run(map[bool]string{true: "push", false: "no push"}[push], func(t *testing.T) {
			r := &countingReader{memReader: memReader{blob: l.blob}}
			mnt, m := mountLayer(t, l.toc, r, fs.Options{Push: push})
			p := filepath.Join(mnt, "lib/libbig.so")
			f, err := os.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if push {
				waitPushed(t, "libbig.so", func() bool { return m.Stats().PushedFiles >= 1 }, func() any { return m.Stats() })
				if got := m.Stats().PushedBytes; got != libSize {
					t.Errorf("pushed %d bytes, want %d", got, libSize)
				}
			}
			before := m.Stats().Reads
			got, err := readWithin(t, p, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			mapped := touchMapping(t, f, libSize)
			if !bytes.Equal(got, lib) || !bytes.Equal(mapped, lib) {
				t.Fatalf("libbig.so reads wrong bytes (read equal: %v, mapping equal: %v)", bytes.Equal(got, lib), bytes.Equal(mapped, lib))
			}
			var st unix.Stat_t
			if err := unix.Stat(p, &st); err != nil || st.Size != libSize {
				t.Fatalf("stat libbig.so: size %d, %v; want %d", st.Size, err, libSize)
			}
			reads := m.Stats().Reads - before
			if push && reads != 0 {
				t.Errorf("reading the pushed file took %d FUSE reads, want 0", reads)
			}
			if !push && reads == 0 {
				t.Errorf("without push, reading the file took no FUSE read: the test proves nothing")
			}

			before = m.Stats().Reads
			if got, err := readWithin(t, filepath.Join(mnt, "lib/unlisted.so"), 10*time.Second); err != nil || !bytes.Equal(got, other) {
				t.Fatalf("unlisted.so reads wrong bytes: %v", err)
			}
			if got, err := readWithin(t, filepath.Join(mnt, "lib/small.py"), 10*time.Second); err != nil || !bytes.Equal(got, small) {
				t.Fatalf("small.py reads wrong bytes: %v", err)
			}
			if m.Stats().Reads == before {
				t.Errorf("unlisted and small files were served without FUSE reads")
			}
			time.Sleep(100 * time.Millisecond)
			if s := m.Stats(); push && (s.PushedFiles != 1 || s.PushedBytes != libSize) || !push && s.PushedFiles != 0 {
				t.Errorf("pushed %d files, %d bytes; want only libbig.so", s.PushedFiles, s.PushedBytes)
			}
		})
	}
}

// TestPushListedParts: a listed file whose list gives parts of it has
// only the 1 MiB pieces holding those parts pushed: they read with no FUSE
// read, the rest of the file through FUSE, all of it the right bytes.
func TestPushListedParts(t *testing.T) {
	const MiB = 1 << 20
	const size = 8*MiB + 1234
	data := randomBytes(14, size)
	l := buildLayer(t, makeTar(t, []tarEntry{dir("lib/", 0o755, 0), reg("lib/modules", 0o644, data, 1)}), testChunkSize)
	l.toc.Prefetch = []string{"lib/modules"}
	// Bytes in piece 1, and a range across pieces 5 and 6.
	l.toc.PrefetchRanges = []artifact.FileRanges{{Name: "lib/modules", Ranges: []artifact.Range{
		{Offset: MiB + 100, Size: 4096}, {Offset: 6*MiB - 10, Size: 20}}}}
	if err := l.toc.Validate(artifact.Limits{}); err != nil {
		t.Fatal(err)
	}
	r := &countingReader{memReader: memReader{blob: l.blob}}
	mnt, m := mountLayer(t, l.toc, r, fs.Options{Push: true})
	p := filepath.Join(mnt, "lib/modules")
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	waitPushed(t, "lib/modules", func() bool { return m.Stats().PushedFiles >= 1 }, func() any { return m.Stats() })
	if got := m.Stats().PushedBytes; got != 3*MiB {
		t.Errorf("pushed %d bytes, want the 3 pieces of 1 MiB holding the listed parts", got)
	}
	readAt := func(off, n int64) int64 {
		t.Helper()
		before := m.Stats().Reads
		buf := make([]byte, n)
		if _, err := f.ReadAt(buf, off); err != nil && err != io.EOF {
			t.Fatalf("read %d+%d: %v", off, n, err)
		}
		if !bytes.Equal(buf, data[off:off+n]) {
			t.Fatalf("read %d+%d: wrong bytes", off, n)
		}
		return m.Stats().Reads - before
	}
	for _, piece := range []int64{1, 5, 6} {
		if n := readAt(piece*MiB, MiB); n != 0 {
			t.Errorf("pushed piece %d took %d FUSE reads, want 0", piece, n)
		}
	}
	if n := readAt(3*MiB, 4096); n == 0 {
		t.Errorf("a piece outside the listed parts was served without a FUSE read: it was pushed")
	}
}

// waitPushed waits up to 20 s for done (a push of what) and fails the test
// with stats when it does not come.
func waitPushed(t *testing.T, what string, done func() bool, stats func() any) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !done() {
		if time.Now().After(deadline) {
			t.Fatalf("%s not pushed within 20 s: stats %+v", what, stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// touchMapping maps f and copies it out page by page, as a program's page
// faults would read it.
func touchMapping(t *testing.T, f *os.File, size int) []byte {
	t.Helper()
	b, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	defer unix.Munmap(b)
	return bytes.Clone(b)
}

// gatedRegistry holds every range request until open is closed.
type gatedRegistry struct {
	*fetcher.Client
	open    chan struct{}
	waiting atomic.Int64
}

func (g *gatedRegistry) ReadRangeInto(ctx context.Context, ref fetcher.Ref, blob digest.Digest, off int64, buf []byte, pace func()) error {
	g.waiting.Add(1)
	select {
	case <-g.open:
	case <-ctx.Done():
		return ctx.Err()
	}
	return g.Client.ReadRangeInto(ctx, ref, blob, off, buf, pace)
}

// TestPushWaitsForPrefetch: the push of a listed file fetches nothing
// itself: it writes the chunks the prefetch brought, once they are there,
// so a large listed file cannot go ahead of the startup's own reads.
func TestPushWaitsForPrefetch(t *testing.T) {
	e := newManagerEnv(t)
	want := files{"app/lib.so": randomBytes(21, 3<<20+777), "app/other.bin": randomBytes(22, 200<<10)}
	img := pushStreamedImageTOC(t, e.client, e.proxy.Host, "test/push", want.tar(t), true, func(toc *artifact.TOC) {
		toc.Prefetch = []string{"app/lib.so"}
	})
	g := &gatedRegistry{Client: e.client, open: make(chan struct{})}
	m := e.managerWith(t, g, func(o *fs.ManagerOptions) {
		o.Background = false
		o.PageCachePush = true
	})
	dir := managerMount(t, m, img.labels())
	f, err := os.Open(filepath.Join(dir, "app/lib.so"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	time.Sleep(300 * time.Millisecond) // a push that fetched would be waiting at the gate now
	if s := m.Stats(); s.PushedBytes != 0 {
		t.Fatalf("%d bytes pushed before any chunk was fetched", s.PushedBytes)
	}
	if g.waiting.Load() == 0 {
		t.Fatal("the prefetch made no request")
	}
	close(g.open)
	waitPushed(t, "lib.so, once the prefetch brought it,", func() bool { return m.Stats().PushedBytes >= int64(len(want["app/lib.so"])) }, func() any { return m.Stats() })
	s := m.Stats()
	if s.OnDemandBytes != 0 || s.PrefetchBytes == 0 {
		t.Errorf("fetched %d bytes on demand and %d by prefetch; want the prefetch alone (the push fetches nothing)", s.OnDemandBytes, s.PrefetchBytes)
	}
	if s.PushedBytes != int64(len(want["app/lib.so"])) {
		t.Errorf("pushed %d bytes, want lib.so's %d", s.PushedBytes, len(want["app/lib.so"]))
	}
	if got, err := io.ReadAll(f); err != nil || !bytes.Equal(got, want["app/lib.so"]) {
		t.Errorf("read lib.so after the push: %v (equal %v)", err, bytes.Equal(got, want["app/lib.so"]))
	}
}

// TestProfileKeepsPushedParts: the parts of a listed file pushed into the
// page cache are read by the kernel without a FUSE read; the startup
// profile of a start that opened the file still lists those parts, so an
// image recorded again with its list keeps them.
func TestProfileKeepsPushedParts(t *testing.T) {
	const MiB = 1 << 20
	e := newManagerEnv(t)
	want := files{"app/modules": randomBytes(23, 6*MiB), "app/unopened": randomBytes(24, 2*MiB)}
	parts := []artifact.Range{{Offset: 2 * MiB, Size: MiB}}
	img := pushStreamedImageTOC(t, e.client, e.proxy.Host, "test/pushprofile", want.tar(t), true, func(toc *artifact.TOC) {
		toc.Prefetch = []string{"app/modules", "app/unopened"}
		toc.PrefetchRanges = []artifact.FileRanges{{Name: "app/modules", Ranges: parts}}
	})
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) {
		o.Background = false
		o.PageCachePush = true
		o.RecordWindow = time.Minute
	})
	dir := managerMount(t, m, img.labels())
	f, err := os.Open(filepath.Join(dir, "app/modules"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	waitPushed(t, "the listed part", func() bool { return m.Stats().PushedBytes >= MiB }, func() any { return m.Stats() })
	buf := make([]byte, MiB)
	if _, err := f.ReadAt(buf, 2*MiB); err != nil || !bytes.Equal(buf, want["app/modules"][2*MiB:3*MiB]) {
		t.Fatalf("read the pushed part: %v", err)
	}
	got, ok := m.Profile(img.ref)
	if !ok || len(got) != 1 || got[0].Path != "/app/modules" || !slices.Equal(got[0].Ranges, parts) {
		t.Fatalf("profile %+v (found %v), want /app/modules with the pushed part %v only", got, ok, parts)
	}
}
