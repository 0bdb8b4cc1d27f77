package fs_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/converter"
	"github.com/streamer-dev/streamer/fs"
)

// testRoot holds every temporary directory of this package's tests (TMPDIR
// points into it), so TestMain can tell our leftover mounts from others'.
var testRoot string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	root, err := os.MkdirTemp("", "streamer-fs-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "create test root:", err)
		return 1
	}
	testRoot = root
	os.Setenv("TMPDIR", root)
	code := m.Run()
	if left := mountsUnder(root); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: mounts left behind by the tests: %v\n", left)
		for i := len(left) - 1; i >= 0; i-- {
			unix.Unmount(left[i], unix.MNT_DETACH)
		}
		code = 1
	}
	if err := os.RemoveAll(root); err != nil {
		fmt.Fprintln(os.Stderr, "remove test root:", err)
	}
	return code
}

// mountsUnder lists the mount points under dir, from /proc/mounts.
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/mounts")
	if err != nil {
		return []string{"cannot read /proc/mounts: " + err.Error()}
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 1 && strings.HasPrefix(fields[1], dir+"/") {
			out = append(out, fields[1])
		}
	}
	return out
}

// requireFUSE skips when this machine cannot mount FUSE filesystems at all.
func requireFUSE(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP LOUDLY: FUSE mount tests need root (direct mount of /dev/fuse)")
	}
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("SKIP LOUDLY: /dev/fuse unusable: %v", err)
	}
	f.Close()
}

// tarEntry is one entry of a test tar.
type tarEntry struct {
	hdr  tar.Header
	data []byte
}

// makeTar writes entries as a PAX tar (sub-second mtimes, xattrs).
func makeTar(t testing.TB, entries []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		h.Format = tar.FormatPAX
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("write tar header %s: %v", h.Name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatalf("write tar data %s: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatalf("close tar: %v", err)
	}
	return buf.Bytes()
}

// testLayer is a layer converted from a tar: its TOC and streaming blob.
type testLayer struct {
	tar  []byte
	toc  *artifact.TOC
	blob []byte
}

// buildLayer converts a tar into a streaming layer with the real converter.
func buildLayer(t testing.TB, tarBytes []byte, chunkSize int64) *testLayer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var blob bytes.Buffer
	res, err := converter.ConvertLayer(ctx, bytes.NewReader(tarBytes), &blob, converter.LayerOptions{ChunkSize: chunkSize})
	if err != nil {
		t.Fatalf("convert layer: %v", err)
	}
	res.TOC.Layer = digest.FromBytes(blob.Bytes())
	return &testLayer{tar: tarBytes, toc: res.TOC, blob: blob.Bytes()}
}

// memReader serves chunks from the blob in memory, verified by DecodeChunk.
type memReader struct {
	blob []byte
}

func (r *memReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	end := c.CompressedOffset + c.CompressedSize
	if c.CompressedOffset < 0 || end > int64(len(r.blob)) {
		return nil, fmt.Errorf("chunk frame [%d, %d) outside blob of %d bytes", c.CompressedOffset, end, len(r.blob))
	}
	return artifact.DecodeChunk(c, r.blob[c.CompressedOffset:end])
}

// countingReader records which chunks (by tar offset) were read, and how.
type countingReader struct {
	memReader
	mu     sync.Mutex
	single []int64   // ReadChunk calls
	multi  [][]int64 // ReadChunks calls (only used through coalescingReader)
}

func (r *countingReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	r.mu.Lock()
	r.single = append(r.single, c.Offset)
	r.mu.Unlock()
	return r.memReader.ReadChunk(ctx, c)
}

// fetched returns every chunk offset read, in any way.
func (r *countingReader) fetched() map[int64]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	got := map[int64]int{}
	for _, o := range r.single {
		got[o]++
	}
	for _, call := range r.multi {
		for _, o := range call {
			got[o]++
		}
	}
	return got
}

func (r *countingReader) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.single, r.multi = nil, nil
}

// coalescingReader also implements fs.ChunksReader.
type coalescingReader struct {
	countingReader
}

var _ fs.ChunksReader = (*coalescingReader)(nil)

func (r *coalescingReader) ReadChunks(ctx context.Context, cs []artifact.Chunk) ([][]byte, error) {
	offs := make([]int64, len(cs))
	for i, c := range cs {
		offs[i] = c.Offset
	}
	r.mu.Lock()
	r.multi = append(r.multi, offs)
	r.mu.Unlock()
	out := make([][]byte, len(cs))
	for i, c := range cs {
		d, err := r.memReader.ReadChunk(ctx, c)
		if err != nil {
			return nil, err
		}
		out[i] = d
	}
	return out, nil
}

// errChunk is what failingReader returns.
var errChunk = errors.New("registry said no")

// failingReader fails every read.
type failingReader struct{}

func (failingReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	return nil, errChunk
}

// blockingReader blocks every read until ctx is done or, when it ignores
// ctx, until release is closed.
type blockingReader struct {
	ignoreCtx bool
	release   chan struct{}
}

func (r *blockingReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	if r.ignoreCtx {
		<-r.release
		return nil, errors.New("released")
	}
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-r.release:
		return nil, errors.New("released")
	}
}

// quietLogger keeps expected read failures out of test output unless -v.
func quietLogger() *logrus.Entry {
	l := logrus.New()
	if !testing.Verbose() {
		l.SetOutput(discardWriter{})
	}
	return logrus.NewEntry(l).WithField("layer", "test")
}

type discardWriter struct{}

func (discardWriter) Write(b []byte) (int, error) { return len(b), nil }

// mountLayer mounts toc read through r on a fresh directory and unmounts it
// when the test ends.
func mountLayer(t testing.TB, toc *artifact.TOC, r fs.ChunkReader, opts fs.Options) (string, *fs.Mounted) {
	t.Helper()
	requireFUSE(t)
	dir := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if opts.Logger == nil {
		opts.Logger = quietLogger()
	}
	m, err := fs.Mount(dir, toc, r, opts)
	if err != nil {
		t.Fatalf("mount: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir, m
}

// withTimeout runs f and fails the test if it does not return within d.
func withTimeout[T any](t testing.TB, d time.Duration, what string, f func() T) T {
	t.Helper()
	done := make(chan T, 1)
	go func() { done <- f() }()
	select {
	case v := <-done:
		return v
	case <-time.After(d):
		t.Fatalf("%s did not return within %v", what, d)
		panic("unreachable")
	}
}
