package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// chunk returns deterministic bytes of size n named by seed, and their digest.
func chunk(seed string, n int) ([]byte, digest.Digest) {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(len(seed)*31 + int(seed[i%len(seed)]) + i)
	}
	return b, digest.FromBytes(b)
}

func openStore(tb testing.TB, opts Options) *Store {
	tb.Helper()
	if opts.Dir == "" {
		opts.Dir = tb.TempDir()
	}
	s, err := Open(opts)
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

func mustPut(tb testing.TB, s *Store, b []byte) digest.Digest {
	tb.Helper()
	d := digest.FromBytes(b)
	if err := s.Put(d, b); err != nil {
		tb.Fatalf("Put %s: %v", d, err)
	}
	return d
}

// testCtx is bounded so that a broken single-flight fails instead of hanging.
func testCtx(tb testing.TB) context.Context {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

// chunkFiles lists the chunk files under dir's digest tree.
func chunkFiles(tb testing.TB, dir string) []string {
	tb.Helper()
	var out []string
	err := walkChunkFiles(dir, digest.SHA256, func(p string, _ fs.DirEntry) error {
		out = append(out, p)
		return nil
	})
	if err != nil {
		tb.Fatalf("walk: %v", err)
	}
	return out
}

func TestPutGet(t *testing.T) {
	for _, memory := range []int64{0, -1} {
		t.Run(fmt.Sprintf("memory=%d", memory), func(t *testing.T) {
			s := openStore(t, Options{MemoryBytes: memory})
			b, d := chunk("a", 1000)
			if _, ok := s.Get(d); ok {
				t.Fatalf("Get hit on an empty store")
			}
			mustPut(t, s, b)
			b[0]++ // the store keeps its own copy
			b[0]--
			got, ok := s.Get(d)
			if !ok || !bytes.Equal(got, b) {
				t.Fatalf("Get after Put: ok=%v, equal=%v", ok, bytes.Equal(got, b))
			}
			if !s.Has(d) || s.Len() != 1 || s.Size() != 1000 {
				t.Errorf("Has=%v Len=%d Size=%d, want true 1 1000", s.Has(d), s.Len(), s.Size())
			}
			if want := s.path(d); len(chunkFiles(t, s.dir)) != 1 || chunkFiles(t, s.dir)[0] != want {
				t.Errorf("files %v, want [%s]", chunkFiles(t, s.dir), want)
			}
			st := s.Stats()
			if memory < 0 && (st.DiskHits != 1 || st.MemoryHits != 0) {
				t.Errorf("stats %+v, want one disk hit", st)
			}
			if memory == 0 && (st.MemoryHits != 1 || st.DiskHits != 0) {
				t.Errorf("stats %+v, want one memory hit", st)
			}
			if st.Misses != 1 {
				t.Errorf("stats %+v, want one miss", st)
			}
		})
	}
}

func TestPath(t *testing.T) {
	s := openStore(t, Options{})
	d := digest.Digest("sha256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789")
	if got, want := s.path(d), filepath.Join(s.dir, "sha256", "ab", d.Encoded()); got != want {
		t.Errorf("path = %s, want %s", got, want)
	}
}

func TestPutRejects(t *testing.T) {
	b, d := chunk("a", 100)
	tests := []struct {
		name string
		d    digest.Digest
		b    []byte
		want error
	}{
		{"other bytes", d, append(bytes.Clone(b), 1), ErrDigestMismatch},
		{"empty bytes", d, nil, ErrDigestMismatch},
		{"malformed digest", "sha256:../../etc", b, nil},
		{"no digest", "", b, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, Options{})
			err := s.Put(tt.d, tt.b)
			if err == nil {
				t.Fatalf("Put accepted")
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("error %v, want %v", err, tt.want)
			}
			if s.Len() != 0 || len(chunkFiles(t, s.dir)) != 0 {
				t.Errorf("rejected bytes were stored")
			}
			if _, ok := s.Get(tt.d); ok {
				t.Errorf("Get found rejected bytes")
			}
		})
	}
}

func TestRestartReuse(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, Options{Dir: dir})
	var ds []digest.Digest
	for i := range 5 {
		b, _ := chunk(fmt.Sprint("c", i), 4096+i)
		ds = append(ds, mustPut(t, s, b))
	}
	size := s.Size()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	// Leftovers of a crash: a half-written temp file and a stray name.
	if err := os.WriteFile(filepath.Join(dir, tmpDir, "chunk-123"), []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	stray := filepath.Join(dir, "sha256", "zz", "not-a-digest")
	if err := os.MkdirAll(filepath.Dir(stray), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stray, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}

	s2 := openStore(t, Options{Dir: dir})
	if s2.Len() != 5 || s2.Size() != size {
		t.Fatalf("after restart Len=%d Size=%d, want 5 %d", s2.Len(), s2.Size(), size)
	}
	for _, d := range ds {
		if _, ok := s2.Get(d); !ok {
			t.Errorf("chunk %s lost across restart", d)
		}
	}
	if st := s2.Stats(); st.DiskHits != 5 {
		t.Errorf("stats %+v, want 5 disk hits", st)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, tmpDir)); len(ents) != 0 {
		t.Errorf("temporary files survived Open: %v", ents)
	}
	if _, err := os.Stat(stray); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stray file survived Open: %v", err)
	}
}

func TestEvictionOrder(t *testing.T) {
	const n = 1000
	tests := []struct {
		name string
		ops  []string // "put X" or "get X"
		keep string   // chunks left on disk, in any order
	}{
		{"oldest goes first", []string{"put a", "put b", "put c", "put d"}, "bcd"},
		{"get refreshes", []string{"put a", "put b", "put c", "get a", "put d"}, "acd"},
		{"put of a stored chunk refreshes", []string{"put a", "put b", "put c", "put a", "put d"}, "acd"},
		{"two evictions", []string{"put a", "put b", "put c", "get a", "put d", "put e"}, "ade"},
	}
	for _, memory := range []int64{0, -1} {
		for _, tt := range tests {
			t.Run(fmt.Sprintf("%s/memory=%d", tt.name, memory), func(t *testing.T) {
				s := openStore(t, Options{MaxBytes: 3 * n, MemoryBytes: memory})
				ds := map[string]digest.Digest{}
				for _, op := range tt.ops {
					name := op[4:]
					b, d := chunk(name, n)
					ds[name] = d
					switch op[:3] {
					case "put":
						mustPut(t, s, b)
					case "get":
						if _, ok := s.Get(d); !ok {
							t.Fatalf("%s: miss", op)
						}
					}
				}
				for name, d := range ds {
					_, err := os.Stat(s.path(d))
					onDisk := err == nil
					if want := bytes.ContainsRune([]byte(tt.keep), rune(name[0])); onDisk != want {
						t.Errorf("chunk %s on disk: %v, want %v", name, onDisk, want)
					}
				}
				if s.Size() > 3*n || s.Len() != len(tt.keep) {
					t.Errorf("Size=%d Len=%d, want <= %d and %d", s.Size(), s.Len(), 3*n, len(tt.keep))
				}
				if got, want := s.Stats().Evictions, int64(len(ds)-len(tt.keep)); got != want {
					t.Errorf("evictions %d, want %d", got, want)
				}
			})
		}
	}
}

func TestEvictionOrderAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, Options{Dir: dir})
	base := time.Now().Add(-time.Hour)
	var ds []digest.Digest
	for i, name := range []string{"a", "b", "c", "d"} {
		b, _ := chunk(name, 1000)
		d := mustPut(t, s, b)
		ds = append(ds, d)
		// Recency survives in modification times: b oldest, then a, d, c.
		order := map[string]int{"b": 0, "a": 1, "d": 2, "c": 3}[name]
		mt := base.Add(time.Duration(order) * time.Minute)
		if err := os.Chtimes(s.path(d), mt, mt); err != nil {
			t.Fatal(err)
		}
		_ = i
	}
	s.Close()
	s2 := openStore(t, Options{Dir: dir, MaxBytes: 2000})
	for i, want := range []bool{false, false, true, true} {
		if got := s2.Has(ds[i]); got != want {
			t.Errorf("chunk %d kept: %v, want %v", i, got, want)
		}
	}
}

func TestCorruptionDetected(t *testing.T) {
	tests := []struct {
		name    string
		corrupt func(p string) error
	}{
		{"flipped byte", func(p string) error {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			b[len(b)/2] ^= 1
			return os.WriteFile(p, b, 0o600)
		}},
		{"truncated", func(p string) error { return os.Truncate(p, 10) }},
		{"emptied", func(p string) error { return os.Truncate(p, 0) }},
		{"extended", func(p string) error {
			f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.Write([]byte("x"))
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, Options{MemoryBytes: -1})
			b, _ := chunk("a", 5000)
			d := mustPut(t, s, b)
			if err := tt.corrupt(s.path(d)); err != nil {
				t.Fatal(err)
			}
			if got, ok := s.Get(d); ok {
				t.Fatalf("Get served %d corrupted bytes", len(got))
			}
			if _, err := os.Stat(s.path(d)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("corrupted file not removed: %v", err)
			}
			if s.Has(d) || s.Size() != 0 {
				t.Errorf("corrupted chunk still indexed: Has=%v Size=%d", s.Has(d), s.Size())
			}
			if st := s.Stats(); st.Corrupted != 1 || st.Misses != 1 {
				t.Errorf("stats %+v, want one corrupted, one miss", st)
			}
			// The chunk can be stored again.
			mustPut(t, s, b)
			if _, ok := s.Get(d); !ok {
				t.Errorf("re-stored chunk missing")
			}
		})
	}
}

func TestDoFetchesOnce(t *testing.T) {
	s := openStore(t, Options{})
	ctx := testCtx(t)
	b, d := chunk("a", 1<<16)
	const callers = 50
	var calls atomic.Int32
	release := make(chan struct{})
	fetch := func(ctx context.Context) ([]byte, error) {
		calls.Add(1)
		select {
		case <-release:
			return bytes.Clone(b), nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		wg.Go(func() {
			got, err := s.Do(ctx, d, fetch)
			if err == nil && !bytes.Equal(got, b) {
				err = errors.New("wrong bytes")
			}
			errs <- err
		})
	}
	waitFor(t, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		f := s.flights[d]
		return f != nil && f.waiters == callers
	})
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("Do: %v", err)
		}
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("fetch ran %d times, want 1", n)
	}
	if !s.Has(d) {
		t.Errorf("fetched chunk not stored")
	}
	if _, err := s.Do(ctx, d, func(context.Context) ([]byte, error) {
		return nil, errors.New("fetch of a stored chunk")
	}); err != nil {
		t.Errorf("Do of a stored chunk: %v", err)
	}
}

// waitFor polls cond for a bounded time.
func waitFor(tb testing.TB, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("condition not met within 5s")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestDoCallerLeavesEarly(t *testing.T) {
	s := openStore(t, Options{})
	ctx := testCtx(t)
	b, d := chunk("a", 1000)
	release := make(chan struct{})
	var fetchCtxErr atomic.Value
	fetch := func(fctx context.Context) ([]byte, error) {
		select {
		case <-release:
		case <-fctx.Done():
			fetchCtxErr.Store(fctx.Err())
			return nil, fctx.Err()
		}
		return b, nil
	}
	impatient, cancel := context.WithCancel(ctx)
	impatientErr := make(chan error, 1)
	go func() {
		_, err := s.Do(impatient, d, fetch)
		impatientErr <- err
	}()
	patient := make(chan error, 1)
	go func() {
		got, err := s.Do(ctx, d, fetch)
		if err == nil && !bytes.Equal(got, b) {
			err = errors.New("wrong bytes")
		}
		patient <- err
	}()
	waitFor(t, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		f := s.flights[d]
		return f != nil && f.waiters == 2
	})
	cancel()
	select {
	case err := <-impatientErr:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("impatient caller: %v, want context.Canceled", err)
		}
	case <-ctx.Done():
		t.Fatalf("impatient caller did not return")
	}
	close(release)
	select {
	case err := <-patient:
		if err != nil {
			t.Errorf("patient caller: %v", err)
		}
	case <-ctx.Done():
		t.Fatalf("patient caller did not return")
	}
	if fetchCtxErr.Load() != nil {
		t.Errorf("fetch was canceled while a caller waited")
	}
	if !s.Has(d) {
		t.Errorf("chunk not stored")
	}
}

func TestDoLastCallerLeavingCancelsFetch(t *testing.T) {
	s := openStore(t, Options{})
	ctx := testCtx(t)
	_, d := chunk("a", 1000)
	canceled := make(chan struct{})
	callerCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := s.Do(callerCtx, d, func(fctx context.Context) ([]byte, error) {
			cancel() // the only caller gives up while the fetch runs
			select {
			case <-fctx.Done():
				close(canceled)
				return nil, fctx.Err()
			case <-ctx.Done():
				return nil, errors.New("fetch not canceled")
			}
		})
		done <- err
	}()
	select {
	case <-canceled:
	case <-ctx.Done():
		t.Fatalf("fetch not canceled when its last caller left")
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Do: %v, want context.Canceled", err)
	}
}

func TestDoNeverStoresBadFetch(t *testing.T) {
	b, d := chunk("a", 1000)
	other, _ := chunk("b", 1000)
	tests := []struct {
		name  string
		fetch func(context.Context) ([]byte, error)
		want  error
	}{
		{"mismatch", func(context.Context) ([]byte, error) { return other, nil }, ErrDigestMismatch},
		{"truncated", func(context.Context) ([]byte, error) { return b[:999], nil }, ErrDigestMismatch},
		{"fetch error", func(context.Context) ([]byte, error) { return b, fs.ErrPermission }, fs.ErrPermission},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, Options{})
			ctx := testCtx(t)
			got, err := s.Do(ctx, d, tt.fetch)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Do: %v, want %v", err, tt.want)
			}
			if got != nil {
				t.Errorf("Do returned bytes with an error")
			}
			if s.Has(d) || len(chunkFiles(t, s.dir)) != 0 {
				t.Errorf("bad fetch was stored")
			}
			// A later Do fetches again and succeeds.
			got, err = s.Do(ctx, d, func(context.Context) ([]byte, error) { return b, nil })
			if err != nil || !bytes.Equal(got, b) {
				t.Errorf("retry: %v", err)
			}
			if st := s.Stats(); st.Fetches != 2 {
				t.Errorf("fetches %d, want 2", st.Fetches)
			}
		})
	}
}

func TestCloseStopsFetches(t *testing.T) {
	s := openStore(t, Options{})
	ctx := testCtx(t)
	_, d := chunk("a", 1000)
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := s.Do(ctx, d, func(fctx context.Context) ([]byte, error) {
			close(started)
			<-fctx.Done()
			return nil, fctx.Err()
		})
		done <- err
	}()
	select {
	case <-started:
	case <-ctx.Done():
		t.Fatal("fetch did not start")
	}
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-ctx.Done():
		t.Fatal("Close did not stop the fetch")
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Do during Close: %v", err)
	}
	if _, err := s.Do(ctx, d, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Do after Close: %v, want ErrClosed", err)
	}
	b, d2 := chunk("b", 10)
	if err := s.Put(d2, b); !errors.Is(err, ErrClosed) {
		t.Errorf("Put after Close: %v, want ErrClosed", err)
	}
}

// TestNoPartialChunkVisible reads every chunk file while large chunks are
// being written: whatever is visible under its digest name must be whole.
func TestNoPartialChunkVisible(t *testing.T) {
	// A small disk bound keeps each scan short while evictions churn.
	s := openStore(t, Options{MemoryBytes: -1, MaxBytes: 4 << 20})
	ctx := testCtx(t)
	stop := make(chan struct{})
	var seen atomic.Int64
	readerErr := make(chan error, 1)
	go func() {
		defer close(readerErr)
		for {
			select {
			case <-stop:
				return
			default:
			}
			var files []string
			filepath.WalkDir(filepath.Join(s.dir, "sha256"), func(p string, de fs.DirEntry, err error) error {
				if err == nil && !de.IsDir() {
					files = append(files, p)
				}
				return nil // entries vanish under eviction; keep walking
			})
			for _, p := range files {
				b, err := os.ReadFile(p)
				if err != nil {
					continue // evicted meanwhile
				}
				seen.Add(1)
				if digest.FromBytes(b).Encoded() != filepath.Base(p) {
					readerErr <- fmt.Errorf("partial or wrong chunk visible at %s (%d bytes)", p, len(b))
					return
				}
			}
		}
	}()
	for i := 0; i < 30 && ctx.Err() == nil; i++ {
		b, _ := chunk(fmt.Sprint("big", i), 1<<20)
		mustPut(t, s, b)
	}
	close(stop)
	if err := <-readerErr; err != nil {
		t.Fatal(err)
	}
	if seen.Load() == 0 {
		t.Errorf("reader saw no chunk files; the test checked nothing")
	}
	if ents, _ := os.ReadDir(filepath.Join(s.dir, tmpDir)); len(ents) != 0 {
		t.Errorf("temporary files left after Put: %d", len(ents))
	}
}

func TestConcurrentMixed(t *testing.T) {
	s := openStore(t, Options{MaxBytes: 20 * 4096, MemoryBytes: 5 * 4096})
	ctx := testCtx(t)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				b, d := chunk(fmt.Sprint("k", (g*7+i)%40), 4096)
				got, err := s.Do(ctx, d, func(context.Context) ([]byte, error) { return b, nil })
				if err != nil || !bytes.Equal(got, b) {
					t.Errorf("Do: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	if s.Size() > 20*4096 {
		t.Errorf("Size %d over bound", s.Size())
	}
	if got := int64(len(chunkFiles(t, s.dir))) * 4096; got != s.Size() {
		t.Errorf("files hold %d bytes, index says %d", got, s.Size())
	}
}

// BenchmarkGetPacked reads the 4 KiB chunks of a pack from disk in turn
// (ReadColdUnchecked, as a layer's check does),
// with the pack's file kept open (openPacks) and opened for each read.
func BenchmarkGetPacked(b *testing.B) {
	const n, size = 256, 4096
	for _, keep := range []bool{true, false} {
		b.Run(map[bool]string{true: "kept open", false: "opened each read"}[keep], func(b *testing.B) {
			s := openStore(b, Options{MemoryBytes: -1})
			if !keep {
				s.openPacks.max = 0
			}
			ds, bs := make([]digest.Digest, n), make([][]byte, n)
			for k := range n {
				bs[k], ds[k] = chunk(fmt.Sprint("packed", k), size)
			}
			if err := s.PutVerifiedRun(ds, bs, true); err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 0, size)
			b.SetBytes(size)
			for i := 0; b.Loop(); i++ {
				if _, ok := s.ReadColdUnchecked(ds[i%n], buf); !ok {
					b.Fatal("miss")
				}
			}
		})
	}
}

func BenchmarkGet(b *testing.B) {
	for _, bc := range []struct {
		name   string
		memory int64
	}{{"memory", 0}, {"disk", -1}} {
		b.Run(bc.name, func(b *testing.B) {
			s := openStore(b, Options{MemoryBytes: bc.memory})
			data, _ := chunk("bench", 1<<20)
			d := mustPut(b, s, data)
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				if _, ok := s.Get(d); !ok {
					b.Fatal("miss")
				}
			}
		})
	}
}

func TestPinnedChunksAreSpared(t *testing.T) {
	const n = 1000
	s := openStore(t, Options{MaxBytes: 3 * n, MemoryBytes: -1})
	d := map[string]digest.Digest{}
	b := map[string][]byte{}
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		b[name], d[name] = chunk(name, n)
	}
	onDisk := func(names string) {
		t.Helper()
		for name, dg := range d {
			_, err := os.Stat(s.path(dg))
			if want := bytes.ContainsRune([]byte(names), rune(name[0])); (err == nil) != want {
				t.Errorf("chunk %s on disk: %v, want %v", name, err == nil, want)
			}
		}
	}
	// A chunk can be pinned before it is stored (a layer mounts before its
	// chunks arrive).
	s.Pin([]digest.Digest{d["a"], d["b"]})
	for _, name := range []string{"a", "b", "c", "d"} {
		mustPut(t, s, b[name])
	}
	onDisk("abd") // c is the oldest unpinned chunk
	// With every other chunk pinned the store goes over its bound rather
	// than drop a mounted layer's data.
	s.Pin([]digest.Digest{d["d"]})
	mustPut(t, s, b["e"])
	onDisk("abde")
	if s.Size() != 4*n {
		t.Errorf("Size = %d, want %d (over the bound, all pinned)", s.Size(), 4*n)
	}
	// Unpinning lets eviction catch up, oldest first.
	s.Unpin([]digest.Digest{d["a"], d["b"]})
	onDisk("bde")
	s.Unpin([]digest.Digest{d["d"]})
	if s.Size() != 3*n {
		t.Errorf("Size = %d after unpinning, want %d", s.Size(), 3*n)
	}
}

func TestRemoveSparesPinned(t *testing.T) {
	const n = 1000
	s := openStore(t, Options{MaxBytes: 10 * n})
	a, da := chunk("a", n)
	b, db := chunk("b", n)
	mustPut(t, s, a)
	mustPut(t, s, b)
	s.Pin([]digest.Digest{db})
	if freed := s.Remove([]digest.Digest{da, db}); freed != n {
		t.Errorf("Remove freed %d bytes, want %d (the unpinned chunk)", freed, n)
	}
	if s.Has(da) {
		t.Error("removed chunk a is still stored")
	}
	if _, err := os.Stat(s.path(da)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("removed chunk a still on disk: %v", err)
	}
	if !s.Has(db) {
		t.Error("pinned chunk b was removed")
	}
	if s.Size() != n || s.Len() != 1 {
		t.Errorf("Size=%d Len=%d after Remove, want %d and 1", s.Size(), s.Len(), n)
	}
}

// TestPutColdSparesMemory: chunks of a background fetch go to disk only, so
// the chunks being read stay in memory however much passes through.
func TestPutColdSparesMemory(t *testing.T) {
	s := openStore(t, Options{MemoryBytes: 64 << 10})
	hot, hotD := chunk("hot", 32<<10)
	if err := s.Put(hotD, hot); err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		b, d := chunk(fmt.Sprintf("cold-%d", i), 32<<10)
		if err := s.PutCold(d, b); err != nil {
			t.Fatal(err)
		}
		if !s.Has(d) {
			t.Fatalf("cold chunk %d not stored", i)
		}
	}
	if got, ok := s.Get(hotD); !ok || !bytes.Equal(got, hot) {
		t.Fatal("hot chunk lost")
	}
	if st := s.Stats(); st.MemoryHits != 1 || st.DiskHits != 0 {
		t.Errorf("stats %+v: want the hot chunk still served from memory after 256 KiB of cold chunks", st)
	}
	// A cold pass over every chunk reads them right and leaves memory alone.
	for i := range 8 {
		b, d := chunk(fmt.Sprintf("cold-%d", i), 32<<10)
		if got, ok := s.GetCold(d); !ok || !bytes.Equal(got, b) {
			t.Fatalf("GetCold of cold chunk %d failed", i)
		}
	}
	s.Get(hotD)
	if st := s.Stats(); st.MemoryHits != 2 || st.DiskHits != 8 {
		t.Errorf("stats %+v: want 8 cold reads from disk and the hot chunk still in memory", st)
	}
	bad, d := chunk("bad", 1024)
	bad[0] ^= 1
	if err := s.PutCold(d, bad); !errors.Is(err, ErrDigestMismatch) {
		t.Errorf("PutCold of altered bytes: %v; want ErrDigestMismatch", err)
	}
}

// TestWriteModes: chunks written through an unnamed file linked to its
// name, and through the named temporary file renamed (filesystems without
// O_TMPFILE), read back whole, survive a restart, leave no temporary file,
// and replace a stray file that sits at a chunk's path unindexed.
func TestWriteModes(t *testing.T) {
	for _, rename := range []bool{false, true} {
		t.Run(fmt.Sprintf("rename=%v", rename), func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, Options{Dir: dir, MemoryBytes: -1})
			s.noTmpfile.Store(rename)
			var ds []digest.Digest
			for i := range 20 {
				b, _ := chunk(fmt.Sprint("mode", i), 1000+i*4096)
				ds = append(ds, mustPut(t, s, b))
			}
			// The same chunk put by many at once: one file, indexed once.
			same, sd := chunk("same", 70000)
			var wg sync.WaitGroup
			for range 8 {
				wg.Go(func() {
					if err := s.Put(sd, same); err != nil {
						t.Errorf("concurrent Put: %v", err)
					}
				})
			}
			wg.Wait()
			ds = append(ds, sd)
			// A stray file at a chunk's path, not in the index (left by a
			// failed removal): Put replaces it with the chunk.
			stray, strayD := chunk("stray", 5000)
			p := s.path(strayD)
			if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte("not the chunk"), 0o600); err != nil {
				t.Fatal(err)
			}
			mustPut(t, s, stray)
			ds = append(ds, strayD)
			if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, stray) {
				t.Errorf("stray file not replaced by the chunk: %q, %v", got[:min(len(got), 20)], err)
			}
			if n := s.Len(); n != len(ds) {
				t.Errorf("%d chunks indexed; want %d", n, len(ds))
			}
			if ents, _ := os.ReadDir(filepath.Join(dir, tmpDir)); len(ents) != 0 {
				t.Errorf("temporary files left: %d", len(ents))
			}
			s.Close()
			s2 := openStore(t, Options{Dir: dir, MemoryBytes: -1})
			for _, d := range ds {
				if b, ok := s2.Get(d); !ok || digest.FromBytes(b) != d {
					t.Errorf("chunk %s not read back after a restart", d)
				}
			}
			if files := chunkFiles(t, dir); len(files) != len(ds) {
				t.Errorf("%d chunk files; want %d", len(files), len(ds))
			}
		})
	}
}

// TestUncheckedPaths: PutVerified stores what its caller checked (and
// still refuses a malformed digest); GetColdUnchecked returns a chunk's
// bytes as they are on disk, damage included, for a caller that hashes
// them itself, while GetCold still catches the damage and removes it.
func TestUncheckedPaths(t *testing.T) {
	s := openStore(t, Options{MemoryBytes: -1})
	b, d := chunk("unchecked", 10000)
	if err := s.PutVerified("sha256:nothex", b, true); err == nil {
		t.Error("PutVerified took a malformed digest")
	}
	if err := s.PutVerified(d, b, true); err != nil {
		t.Fatal(err)
	}
	if got, ok := s.GetColdUnchecked(d); !ok || !bytes.Equal(got, b) {
		t.Fatalf("GetColdUnchecked of a sound chunk: %v", ok)
	}
	damaged := bytes.Clone(b)
	damaged[5000] ^= 1
	if err := os.WriteFile(s.path(d), damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	if got, ok := s.GetColdUnchecked(d); !ok || !bytes.Equal(got, damaged) {
		t.Errorf("GetColdUnchecked: %v; want the bytes on disk as they are", ok)
	}
	if _, ok := s.GetCold(d); ok {
		t.Error("GetCold served a damaged chunk")
	}
	if s.Has(d) {
		t.Error("damaged chunk still indexed after GetCold")
	}
}
