package fs_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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
				deadline := time.Now().Add(20 * time.Second)
				for m.Stats().PushedFiles < 1 {
					if time.Now().After(deadline) {
						t.Fatalf("libbig.so not pushed within 20 s: %+v", m.Stats())
					}
					time.Sleep(10 * time.Millisecond)
				}
				if got := m.Stats().PushedBytes; got != libSize {
					t.Errorf("pushed %d bytes, want %d", got, libSize)
				}
			}
			before := m.Stats().Reads
			got := readFile(t, p)
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
			if got := readFile(t, filepath.Join(mnt, "lib/unlisted.so")); !bytes.Equal(got, other) {
				t.Fatal("unlisted.so reads wrong bytes")
			}
			if got := readFile(t, filepath.Join(mnt, "lib/small.py")); !bytes.Equal(got, small) {
				t.Fatal("small.py reads wrong bytes")
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

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
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
