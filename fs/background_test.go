package fs_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/cache"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/fs"
)

// rangeCall is one range request a Manager made.
type rangeCall struct {
	blob   digest.Digest
	off, n int64
}

// recordingRegistry is the real registry client, recording the range
// requests made through it in order.
type recordingRegistry struct {
	*fetcher.Client
	mu    sync.Mutex
	calls []rangeCall
}

func (r *recordingRegistry) ReadRangeInto(ctx context.Context, ref fetcher.Ref, blob digest.Digest, off int64, buf []byte, pace func()) error {
	r.mu.Lock()
	r.calls = append(r.calls, rangeCall{blob, off, int64(len(buf))})
	r.mu.Unlock()
	return r.Client.ReadRangeInto(ctx, ref, blob, off, buf, pace)
}

func (r *recordingRegistry) ranges() []rangeCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]rangeCall(nil), r.calls...)
}

// managerWith opens the cache and a Manager whose options tune alters.
func (e *managerEnv) managerWith(t *testing.T, reg fs.Registry, tune func(*fs.ManagerOptions)) *fs.Manager {
	t.Helper()
	st, err := cache.Open(cache.Options{Dir: filepath.Join(e.root, "cache"), MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	e.cache = st
	if reg == nil {
		reg = e.client
	}
	opts := fs.ManagerOptions{
		Root:        filepath.Join(e.root, "layers"),
		Registry:    reg,
		Cache:       st,
		ReadTimeout: 3 * time.Second,
		Logger:      quietLogger(),
		Prefetch:    true,
		Background:  true,
	}
	if tune != nil {
		tune(&opts)
	}
	m, err := fs.NewManager(opts)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			if err := m.Close(); err != nil {
				t.Errorf("close manager: %v", err)
			}
			st.Close()
		}
	})
	return m
}

// layerStatus returns the status of layer, and whether it is mounted.
func layerStatus(m *fs.Manager, layer digest.Digest) (fs.LayerStatus, bool) {
	for _, s := range m.Status() {
		if s.Layer == layer {
			return s, true
		}
	}
	return fs.LayerStatus{}, false
}

// waitStatus polls the status of layer until ok says so, for at most d.
func waitStatus(t *testing.T, m *fs.Manager, layer digest.Digest, d time.Duration, what string, ok func(fs.LayerStatus) bool) fs.LayerStatus {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		s, found := layerStatus(m, layer)
		if found && ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("layer %s not %s within %v: status %+v (mounted %v)", layer, what, d, s, found)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func isComplete(s fs.LayerStatus) bool { return s.Complete }

// files is a layer's regular files by name.
type files map[string][]byte

func (f files) tar(t *testing.T) []byte {
	t.Helper()
	entries := []tarEntry{dir("app/", 0o755, 1)}
	for _, name := range sortedKeys(f) {
		entries = append(entries, reg(name, 0o644, f[name], 2))
	}
	return makeTar(t, entries)
}

func sortedKeys(f files) []string {
	var names []string
	for n := range f {
		names = append(names, n)
	}
	for i := range names {
		for j := i + 1; j < len(names); j++ {
			if names[j] < names[i] {
				names[i], names[j] = names[j], names[i]
			}
		}
	}
	return names
}

func readAll(t *testing.T, dir string, want files) {
	t.Helper()
	for name, data := range want {
		got, err := readWithin(t, filepath.Join(dir, name), 10*time.Second)
		if err != nil || !bytes.Equal(got, data) {
			t.Errorf("read %s: %v (equal %v)", name, err, bytes.Equal(got, data))
		}
	}
}

func TestBackgroundCompletesLayerThenNeedsNoRegistry(t *testing.T) {
	e := newManagerEnv(t)
	want := files{
		"app/big.bin":   randomBytes(21, 3<<20),
		"app/mid.bin":   randomBytes(22, 700<<10),
		"app/small.txt": []byte("small\n"),
	}
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/bg", want.tar(t), true)
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) { o.MaxCoalesce = 1 << 20; o.BackgroundConcurrency = 2 })

	dir := managerMount(t, m, img.labels())
	s := waitStatus(t, m, img.layer, 30*time.Second, "complete", isComplete)
	if s.FetchedPercent != 100 || s.Bad || s.CachedBytes != s.UncompressedSize || s.FetchedBytes == 0 {
		t.Errorf("complete layer status: %+v", s)
	}
	st := m.Stats()
	if st.BackgroundBytes == 0 || st.LayersComplete != 1 || st.FetchLatency.Count() == 0 {
		t.Errorf("stats after background fetch: %+v", st)
	}
	if st.OnDemandBytes != 0 {
		t.Errorf("on-demand bytes = %d; nothing was read", st.OnDemandBytes)
	}

	// Registry gone: every file reads.
	e.proxy.SetDown(true)
	e.reg.Stop()
	before := e.proxy.Requests()
	readAll(t, dir, want)
	if n := e.proxy.Requests() - before; n != 0 {
		t.Errorf("reads of a complete layer made %d registry requests", n)
	}

	// Restart: the record says complete; nothing is fetched again.
	if err := m.Unmount(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	m.Close()
	e.cache.Close()
	m2 := e.managerWith(t, nil, nil)
	dir2 := managerMount(t, m2, img.labels())
	if s, _ := layerStatus(m2, img.layer); !s.Complete {
		t.Errorf("after restart the layer is not known complete: %+v", s)
	}
	readAll(t, dir2, want)
	if n := e.proxy.Requests() - before; n != 0 {
		t.Errorf("restart and reads made %d registry requests", n)
	}
}

func TestBackgroundCatchesWrongDiffID(t *testing.T) {
	e := newManagerEnv(t)
	want := files{"app/a.bin": randomBytes(31, 500<<10), "app/b.txt": []byte("b\n")}
	img := pushStreamedImageTOC(t, e.client, e.proxy.Host, "test/baddiff", want.tar(t), true, func(toc *artifact.TOC) {
		toc.DiffID = digest.FromString("not this layer")
	})
	m := e.managerWith(t, nil, nil)
	// With the snapshotter's chain-id labels the wrong diffID is refused at
	// mount (TestManagerBindsTOCToImage); without them (a caller that is not
	// the snapshotter) completion is what catches it.
	labels := img.labels()
	delete(labels, fs.LabelSnapshotRef)
	delete(labels, fs.LabelParent)
	dir := managerMount(t, m, labels)
	s := waitStatus(t, m, img.layer, 30*time.Second, "marked bad", func(s fs.LayerStatus) bool { return s.Bad })
	if s.Complete {
		t.Errorf("a layer failing its diffID check is complete: %+v", s)
	}
	if st := m.Stats(); st.LayersBad != 1 || st.LayersComplete != 0 {
		t.Errorf("stats: %d bad, %d complete; want 1, 0", st.LayersBad, st.LayersComplete)
	}
	// Chunks are verified one by one: the mount still serves them.
	readAll(t, dir, want)
	if err := m.Unmount(context.Background(), dir); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Mount(ctx, t.TempDir(), labels); !errors.Is(err, fs.ErrNotStreamable) {
		t.Errorf("mount after a failed diffID check: %v; want ErrNotStreamable", err)
	}
	m.Close()
	e.cache.Close()
	m2 := e.managerWith(t, nil, nil)
	if err := m2.Mount(ctx, t.TempDir(), labels); !errors.Is(err, fs.ErrNotStreamable) {
		t.Errorf("mount after restart: %v; want ErrNotStreamable", err)
	}
}

func TestPrefetchFirstInOrder(t *testing.T) {
	e := newManagerEnv(t)
	want := files{}
	for i, c := range "abcdef" {
		want[fmt.Sprintf("app/%c.bin", c)] = randomBytes(uint64(40+i), 200<<10)
	}
	prefetch := []string{"app/e.bin", "app/b.bin", "app/d.bin"}
	img := pushStreamedImageTOC(t, e.client, e.proxy.Host, "test/prefetch", want.tar(t), true, func(toc *artifact.TOC) {
		toc.Prefetch = prefetch
	})
	rec := &recordingRegistry{Client: e.client}
	m := e.managerWith(t, rec, func(o *fs.ManagerOptions) { o.BackgroundConcurrency = 1 })
	dir := managerMount(t, m, img.labels())
	waitStatus(t, m, img.layer, 30*time.Second, "complete", isComplete)
	toc := tocOf(t, e, img.layer)
	calls := rec.ranges()
	if len(calls) < len(prefetch)+1 {
		t.Fatalf("%d range requests; want the %d prefetch files first, then the rest", len(calls), len(prefetch))
	}
	for i, name := range prefetch {
		cs := chunksOf(toc, name)
		first, last := cs[0], cs[len(cs)-1]
		wantOff, wantN := first.CompressedOffset, last.CompressedOffset+last.CompressedSize-first.CompressedOffset
		if calls[i].off != wantOff || calls[i].n != wantN {
			t.Errorf("request %d: [%d, +%d); want prefetch file %s at [%d, +%d)", i, calls[i].off, calls[i].n, name, wantOff, wantN)
		}
	}
	// No byte is fetched twice.
	var total int64
	for _, c := range calls {
		total += c.n
	}
	if total != toc.BlobSize {
		t.Errorf("fetched %d bytes in all; want the blob's %d once", total, toc.BlobSize)
	}
	if st := m.Stats(); st.PrefetchBytes == 0 || st.BackgroundBytes == 0 {
		t.Errorf("stats: prefetch %d, background %d bytes; want both", st.PrefetchBytes, st.BackgroundBytes)
	}
	readAll(t, dir, want)
}

// TestPrefetchMergesListedFiles: with a prefetch gap, the listed files
// and the unlisted ones between them come in one request, before the rest.
func TestPrefetchMergesListedFiles(t *testing.T) {
	e := newManagerEnv(t)
	want := files{}
	for i, c := range "abcdef" {
		want[fmt.Sprintf("app/%c.bin", c)] = randomBytes(uint64(70+i), 200<<10)
	}
	img := pushStreamedImageTOC(t, e.client, e.proxy.Host, "test/prefetchgap", want.tar(t), true, func(toc *artifact.TOC) {
		toc.Prefetch = []string{"app/e.bin", "app/b.bin", "app/d.bin"}
	})
	rec := &recordingRegistry{Client: e.client}
	m := e.managerWith(t, rec, func(o *fs.ManagerOptions) {
		o.BackgroundConcurrency = 1
		o.PrefetchGap = 1 << 20
	})
	dir := managerMount(t, m, img.labels())
	waitStatus(t, m, img.layer, 30*time.Second, "complete", isComplete)
	toc := tocOf(t, e, img.layer)
	calls := rec.ranges()
	b, eb := chunksOf(toc, "app/b.bin"), chunksOf(toc, "app/e.bin")
	wantOff := b[0].CompressedOffset
	wantN := eb[len(eb)-1].CompressedOffset + eb[len(eb)-1].CompressedSize - wantOff
	if len(calls) == 0 || calls[0].off != wantOff || calls[0].n != wantN {
		t.Fatalf("first request %+v; want b.bin to e.bin in one request [%d, +%d) (requests: %+v)", calls[0], wantOff, wantN, calls)
	}
	var total int64
	for _, c := range calls {
		total += c.n
	}
	if total != toc.BlobSize {
		t.Errorf("fetched %d bytes in all; want the blob's %d once", total, toc.BlobSize)
	}
	if st := m.Stats(); st.PrefetchBytes != wantN {
		t.Errorf("prefetch bytes %d; want the merged request's %d", st.PrefetchBytes, wantN)
	}
	readAll(t, dir, want)
}

// TestReadaheadFollowsOnDemandReads: an on-demand read makes the files laid
// out after it come next, ahead of the background fetch still busy
// elsewhere in the layer; the next read of them needs no request.
func TestReadaheadFollowsOnDemandReads(t *testing.T) {
	e := newManagerEnv(t)
	want := files{"app/0-big.bin": randomBytes(80, 24<<20)}
	for i := range 12 {
		want[fmt.Sprintf("app/f%02d.py", i)] = randomBytes(uint64(81+i), 100<<10)
	}
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/readahead", want.tar(t), true)
	rec := &recordingRegistry{Client: e.client}
	m := e.managerWith(t, rec, func(o *fs.ManagerOptions) {
		o.BackgroundConcurrency = 1
		o.BackgroundRateLimit = 4 << 20 // the big file keeps background busy for seconds
		o.Readahead = 1 << 20
	})
	dir := managerMount(t, m, img.labels())
	toc := tocOf(t, e, img.layer)
	if got, err := readWithin(t, filepath.Join(dir, "app/f03.py"), 10*time.Second); err != nil || !bytes.Equal(got, want["app/f03.py"]) {
		t.Fatalf("read f03.py: %v", err)
	}
	// f04..f12 hold 900 KiB: the 1 MiB read-ahead brings f04..f11 at least.
	ahead := []string{"app/f04.py", "app/f05.py", "app/f06.py", "app/f07.py", "app/f08.py"}
	deadline := time.Now().Add(10 * time.Second)
	for _, name := range ahead {
		for _, c := range chunksOf(toc, name) {
			for !e.cache.Has(c.Digest) {
				if time.Now().After(deadline) {
					t.Fatalf("%s not fetched ahead within 10 s (requests: %+v)", name, rec.ranges())
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	if s, _ := layerStatus(m, img.layer); s.Complete || s.FetchedPercent > 60 {
		t.Fatalf("the background fetch already has most of the layer (%+v): read-ahead not shown ahead of it", s)
	}
	n := len(rec.ranges())
	for _, name := range ahead {
		if got, err := readWithin(t, filepath.Join(dir, name), 10*time.Second); err != nil || !bytes.Equal(got, want[name]) {
			t.Fatalf("read %s: %v", name, err)
		}
	}
	if st := m.Stats(); st.OnDemandBytes > 200<<10 || st.PrefetchBytes == 0 {
		t.Errorf("stats %+v: want one on-demand read and the rest read ahead", st)
	}
	t.Logf("%d range requests by then, %d after reading the files read ahead", n, len(rec.ranges()))
}

func TestBackgroundDisabledFetchesOnlyWhatIsRead(t *testing.T) {
	e := newManagerEnv(t)
	want := files{"app/read.txt": []byte("read me\n"), "app/unread.bin": randomBytes(51, 2<<20)}
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/nobg", want.tar(t), true)
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) { o.Background = false })
	dir := managerMount(t, m, img.labels())
	e.proxy.ResetCounters()
	got, err := readWithin(t, filepath.Join(dir, "app/read.txt"), 10*time.Second)
	if err != nil || !bytes.Equal(got, want["app/read.txt"]) {
		t.Fatalf("read: %q, %v", got, err)
	}
	read := e.proxy.BlobBytes()
	time.Sleep(time.Second) // what background fetch would have used
	if n := e.proxy.BlobBytes(); n != read || n > 128<<10 {
		t.Errorf("fetched %d bytes (%d by the read); want only the read chunk", n, read)
	}
	s, _ := layerStatus(m, img.layer)
	if s.Complete || s.FetchedPercent >= 10 {
		t.Errorf("status with background off: %+v", s)
	}
	if st := m.Stats(); st.BackgroundBytes != 0 || st.OnDemandBytes == 0 {
		t.Errorf("stats: %+v", st)
	}
}

func TestBackgroundRoundRobinAndSharedChunks(t *testing.T) {
	e := newManagerEnv(t)
	shared := randomBytes(61, 1<<20)
	a := files{"app/a.bin": randomBytes(62, 1<<20), "app/shared.bin": shared}
	b := files{"app/b.bin": randomBytes(63, 1<<20), "app/shared.bin": shared}
	imgA := pushStreamedImage(t, e.client, e.proxy.Host, "test/rra", a.tar(t), true)
	imgB := pushStreamedImage(t, e.client, e.proxy.Host, "test/rrb", b.tar(t), true)
	rec := &recordingRegistry{Client: e.client}
	// Small runs, one worker, slowed down: the order of requests shows
	// the turns the layers take.
	m := e.managerWith(t, rec, func(o *fs.ManagerOptions) {
		o.BackgroundConcurrency = 1
		o.MaxCoalesce = 128 << 10
		o.BackgroundRateLimit = 4 << 20
	})
	managerMount(t, m, imgA.labels())
	managerMount(t, m, imgB.labels())
	waitStatus(t, m, imgA.layer, 30*time.Second, "complete", isComplete)
	waitStatus(t, m, imgB.layer, 30*time.Second, "complete", isComplete)

	calls := rec.ranges()
	blobs := map[digest.Digest]int{}
	var order []digest.Digest
	for _, c := range calls {
		if _, ok := blobs[c.blob]; !ok {
			order = append(order, c.blob)
		}
		blobs[c.blob]++
	}
	if len(order) != 2 {
		t.Fatalf("requests went to %d blobs; want 2", len(order))
	}
	// Round robin: once the second layer is there, the layers take turns
	// (the first one is 2 MiB at 4 MiB/s: it still has work then).
	k := 0
	for k < len(calls) && calls[k].blob == order[0] {
		k++
	}
	if k+4 > len(calls) {
		t.Fatalf("the second layer was fetched only at request %d of %d", k, len(calls))
	}
	for i := k; i < k+4; i++ {
		if calls[i].blob != order[(i-k+1)%2] {
			t.Errorf("requests %d-%d do not alternate between the layers: %v", k, k+3, calls[k:k+4])
			break
		}
	}
	// The shared file's chunks (same digests) were fetched once.
	var total int64
	for _, c := range calls {
		total += c.n
	}
	tocA, tocB := tocOf(t, e, imgA.layer), tocOf(t, e, imgB.layer)
	var sharedSize int64
	for _, c := range chunksOf(tocB, "app/shared.bin") {
		sharedSize += c.CompressedSize
	}
	if limit := tocA.BlobSize + tocB.BlobSize - sharedSize; total > limit {
		t.Errorf("fetched %d bytes; want at most %d (shared chunks once)", total, limit)
	}
}

func TestUnmountStopsBackgroundWork(t *testing.T) {
	e := newManagerEnv(t)
	want := files{"app/big.bin": randomBytes(71, 4<<20)}
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/stop", want.tar(t), true)
	// 256 KiB/s: the layer would take 16 s.
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) { o.BackgroundRateLimit = 256 << 10; o.MaxCoalesce = 256 << 10 })
	dir := managerMount(t, m, img.labels())
	waitStatus(t, m, img.layer, 10*time.Second, "fetching", func(s fs.LayerStatus) bool { return s.FetchedBytes > 0 })
	start := time.Now()
	if err := m.Unmount(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("unmount took %v while background work ran", d)
	}
	before := e.proxy.BlobRequests()
	time.Sleep(1500 * time.Millisecond)
	if n := e.proxy.BlobRequests() - before; n != 0 {
		t.Errorf("%d requests after unmount", n)
	}
	if _, ok := layerStatus(m, img.layer); ok {
		t.Errorf("unmounted layer still in status")
	}
	_ = os.Remove(dir)
}

// TestBackgroundBridgesCachedChunks: after a startup has read every other
// small file of a layer, the background fetch brings the rest in a few
// large requests, fetching the few cached chunks between the missing ones
// again, rather than a round trip for each missing file.
func TestBackgroundBridgesCachedChunks(t *testing.T) {
	e := newManagerEnv(t)
	want := files{}
	for i := range 200 {
		want[fmt.Sprintf("lib/m%03d.py", i)] = randomBytes(uint64(300+i), 3<<10)
	}
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/bridge", want.tar(t), true)

	// A first daemon, background fetch off, serves a startup that reads
	// every other file.
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) { o.Background = false })
	dir := managerMount(t, m, img.labels())
	for i := 0; i < 200; i += 2 {
		name := fmt.Sprintf("lib/m%03d.py", i)
		if got, err := readWithin(t, filepath.Join(dir, name), 10*time.Second); err != nil || !bytes.Equal(got, want[name]) {
			t.Fatalf("read %s: %v", name, err)
		}
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	e.cache.Close()

	// The next one completes the layer from that cache.
	rec := &recordingRegistry{Client: e.client}
	m = e.managerWith(t, rec, func(o *fs.ManagerOptions) { o.PrefetchGap = 64 << 10 })
	dir = managerMount(t, m, img.labels())
	waitStatus(t, m, img.layer, 30*time.Second, "complete", isComplete)
	toc := tocOf(t, e, img.layer)
	calls := rec.ranges()
	var total int64
	for _, c := range calls {
		total += c.n
	}
	// 100 missing files between 100 cached ones: one request of the
	// whole blob (about 700 KiB, under max_coalesce) instead of 100.
	if len(calls) > 2 || total > toc.BlobSize {
		t.Errorf("%d range requests, %d bytes (blob %d); want at most 2 requests, the blob at most once: %+v", len(calls), total, toc.BlobSize, calls)
	}
	readAll(t, dir, want)
}

// TestCompletionRefetchesDamagedChunk: a chunk damaged on disk before the
// layer's completion check makes the rebuilt tar mismatch its diffID; the
// check then finds the damaged chunk, which is fetched again, and the
// layer completes: it is not taken for a layer whose TOC is wrong.
func TestCompletionRefetchesDamagedChunk(t *testing.T) {
	e := newManagerEnv(t)
	want := files{"app/a.bin": randomBytes(401, 300<<10), "app/b.bin": randomBytes(402, 300<<10)}
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/damaged", want.tar(t), true)

	// A first daemon, background fetch off, reads the files: their
	// chunks are cached, the layer is not complete.
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) { o.Background = false })
	readAll(t, managerMount(t, m, img.labels()), want)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	e.cache.Close()
	chunks := chunkFiles(filepath.Join(e.root, "cache"))
	if len(chunks) == 0 {
		t.Fatal("no chunk cached by the reads")
	}
	b, err := os.ReadFile(chunks[0])
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x01
	if err := os.WriteFile(chunks[0], b, 0o600); err != nil {
		t.Fatal(err)
	}

	m = e.managerWith(t, nil, nil)
	dir := managerMount(t, m, img.labels())
	s := waitStatus(t, m, img.layer, 30*time.Second, "complete or bad", func(s fs.LayerStatus) bool { return s.Complete || s.Bad })
	if !s.Complete || s.Bad || m.Stats().LayersBad != 0 {
		t.Fatalf("status %+v, layers bad %d: want the damaged chunk fetched again and the layer complete", s, m.Stats().LayersBad)
	}
	got, err := os.ReadFile(chunks[0])
	if err != nil || digest.FromBytes(got).Encoded() != filepath.Base(chunks[0]) {
		t.Errorf("damaged chunk not stored again whole: %v", err)
	}
	readAll(t, dir, want)
}
