package fs_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fs"
)

// entry returns the TOC entry named name.
func entry(t *testing.T, toc *artifact.TOC, name string) artifact.Entry {
	t.Helper()
	for _, e := range toc.Entries {
		if e.Name == name {
			return e
		}
	}
	t.Fatalf("no TOC entry %q", name)
	return artifact.Entry{}
}

// preadRandom reads [off, off+n) of the file with kernel read-ahead off, so
// that the kernel asks the filesystem for those pages only.
func preadRandom(t *testing.T, p string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_RANDOM); err != nil {
		t.Fatalf("fadvise: %v", err)
	}
	buf := make([]byte, n)
	got, err := f.ReadAt(buf, off)
	if err != nil && got != n {
		t.Fatalf("pread %d bytes at %d: %v", n, off, err)
	}
	return buf
}

func TestReadFetchesOnlyTouchedChunks(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()), testChunkSize)
	big := entry(t, l.toc, "data/big.bin")
	content := randomBytes(1, bigSize)
	const cs = testChunkSize
	tests := []struct {
		name   string
		off    int64
		n      int
		chunks []int64 // chunk indexes within the file
	}{
		{"first page", 0, 4096, []int64{0}},
		{"page inside chunk 2", 2*cs + 8192, 4096, []int64{2}},
		{"across a chunk boundary", cs - 4096, 8192, []int64{0, 1}},
		{"tail of the file", int64(bigSize) - 100, 100, []int64{5}},
		{"four chunks", cs, 4 * cs, []int64{1, 2, 3, 4}},
	}
	for _, coalesce := range []bool{false, true} {
		for _, tt := range tests {
			t.Run(fmt.Sprintf("coalesce=%v/%s", coalesce, tt.name), func(t *testing.T) {
				cr := &coalescingReader{countingReader{memReader: memReader{blob: l.blob}}}
				var r fs.ChunkReader = &cr.countingReader
				if coalesce {
					r = cr
				}
				mnt, _ := mountLayer(t, l.toc, r, fs.Options{})
				got := preadRandom(t, filepath.Join(mnt, "data/big.bin"), tt.off, tt.n)
				if !bytes.Equal(got, content[tt.off:tt.off+int64(tt.n)]) {
					t.Errorf("content of [%d, +%d) differs", tt.off, tt.n)
				}
				want := map[int64]int{}
				for _, k := range tt.chunks {
					want[big.Offset+k*cs] = 1
				}
				if got := cr.fetched(); fmt.Sprint(got) != fmt.Sprint(want) {
					t.Errorf("fetched chunks (tar offset: times) %v, want %v", got, want)
				}
				cr.mu.Lock()
				defer cr.mu.Unlock()
				if !coalesce && len(cr.multi) != 0 {
					t.Errorf("ReadChunks called on a reader without it")
				}
				if coalesce && len(tt.chunks) > 1 {
					if len(cr.single) != 0 {
						t.Errorf("a multi-chunk read went chunk by chunk: %v", cr.single)
					}
					var widest int
					for _, call := range cr.multi {
						widest = max(widest, len(call))
						if !sort.SliceIsSorted(call, func(i, j int) bool { return call[i] < call[j] }) {
							t.Errorf("ReadChunks run out of order: %v", call)
						}
					}
					if widest < 2 {
						t.Errorf("no ReadChunks call fetched more than one chunk: %v", cr.multi)
					}
				}
			})
		}
	}
}

func TestEmptyFileFetchesNothing(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()), testChunkSize)
	cr := &countingReader{memReader: memReader{blob: l.blob}}
	mnt, _ := mountLayer(t, l.toc, cr, fs.Options{})
	got, err := os.ReadFile(filepath.Join(mnt, "etc/empty"))
	if err != nil || len(got) != 0 {
		t.Errorf("read empty file: %q, %v", got, err)
	}
	if f := cr.fetched(); len(f) != 0 {
		t.Errorf("reading an empty file fetched chunks %v", f)
	}
}

func TestReadErrors(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()), testChunkSize)
	tests := []struct {
		name    string
		reader  func(t *testing.T) fs.ChunkReader
		timeout time.Duration
	}{
		{"reader fails", func(t *testing.T) fs.ChunkReader { return failingReader{} }, 0},
		{"reader blocks until its context ends", func(t *testing.T) fs.ChunkReader {
			r := &blockingReader{release: make(chan struct{})}
			t.Cleanup(func() { close(r.release) })
			return r
		}, 300 * time.Millisecond},
		{"reader ignores its context", func(t *testing.T) fs.ChunkReader {
			r := &blockingReader{ignoreCtx: true, release: make(chan struct{})}
			t.Cleanup(func() { close(r.release) })
			return r
		}, 300 * time.Millisecond},
		{"reader returns corrupt chunks", func(t *testing.T) fs.ChunkReader { return shortReader{&memReader{blob: l.blob}} }, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := tt.reader(t)
			mnt, m := mountLayer(t, l.toc, r, fs.Options{ReadTimeout: tt.timeout})
			for _, name := range []string{"etc/passwd", "data/big.bin"} {
				err := withTimeout(t, 20*time.Second, "read of "+name, func() error {
					_, err := os.ReadFile(filepath.Join(mnt, name))
					return err
				})
				if !errors.Is(err, unix.EIO) {
					t.Errorf("read %s: %v, want EIO", name, err)
				}
			}
			if s := m.Stats(); s.Errors == 0 {
				t.Errorf("stats %+v: no error counted", s)
			}
			// Metadata needs no chunk.
			if _, err := os.ReadDir(filepath.Join(mnt, "etc")); err != nil {
				t.Errorf("readdir after failed reads: %v", err)
			}
		})
	}
}

// shortReader returns chunks one byte short.
type shortReader struct{ r *memReader }

func (s shortReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	d, err := s.r.ReadChunk(ctx, c)
	if err != nil || len(d) == 0 {
		return d, err
	}
	return d[:len(d)-1], nil
}

func TestConcurrentReads(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()), testChunkSize)
	mnt, _ := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{})
	content := randomBytes(1, bigSize)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 8 {
		wg.Go(func() {
			f, err := os.Open(filepath.Join(mnt, "data/big.bin"))
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			buf := make([]byte, 20000)
			for i := range 50 {
				off := int64((g*7919 + i*104729) % (bigSize - len(buf)))
				if _, err := f.ReadAt(buf, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(buf, content[off:off+int64(len(buf))]) {
					errs <- fmt.Errorf("goroutine %d: content at %d differs", g, off)
					return
				}
			}
		})
	}
	withTimeout(t, 30*time.Second, "concurrent reads", func() bool { wg.Wait(); return true })
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestFUSEStatsTimeRequests: a mount given FUSEStats times its requests by
// operation; what a user does (look a file up, open it, read it) shows
// under the operation's name.
func TestFUSEStatsTimeRequests(t *testing.T) {
	l := buildLayer(t, makeTar(t, richEntries()), testChunkSize)
	var st fs.FUSEStats
	mnt, _ := mountLayer(t, l.toc, &memReader{blob: l.blob}, fs.Options{FUSEStats: &st})
	if got := preadRandom(t, filepath.Join(mnt, "data/big.bin"), 0, 8192); len(got) != 8192 {
		t.Fatalf("read %d bytes", len(got))
	}
	ops := st.Snapshot()
	for _, op := range []string{"lookup", "open", "read"} {
		h, ok := ops[op]
		if !ok || h.Count() == 0 {
			t.Errorf("no %s timed; got %v", op, ops)
			continue
		}
		if h.Sum <= 0 || len(h.Counts) != len(h.Bounds)+1 {
			t.Errorf("%s histogram %+v", op, h)
		}
	}
	if n := ops["read"].Count(); n > 4 {
		t.Errorf("%d reads timed for one 8 KiB pread; want 1 or 2", n)
	}
}
