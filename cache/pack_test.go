package cache

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// run returns n chunks named by seed, of sizes from 1 to 8 KiB.
func run(seed string, n int) ([]digest.Digest, [][]byte) {
	ds, bs := make([]digest.Digest, n), make([][]byte, n)
	for i := range n {
		bs[i], ds[i] = chunk(fmt.Sprint(seed, i), 1024*(1+i%8)+i)
	}
	return ds, bs
}

func packFiles(tb testing.TB, dir string) []string {
	tb.Helper()
	ps, err := filepath.Glob(filepath.Join(dir, packDir, "*"))
	if err != nil {
		tb.Fatal(err)
	}
	return ps
}

// diskBytes sums the chunk bytes of the files under dir: chunk files
// whole, packs without their headers.
func diskBytes(tb testing.TB, dir string) int64 {
	tb.Helper()
	var n int64
	for _, p := range chunkFiles(tb, dir) {
		info, err := os.Stat(p)
		if err != nil {
			tb.Fatal(err)
		}
		n += info.Size()
	}
	for _, p := range packFiles(tb, dir) {
		f, err := os.Open(p)
		if err != nil {
			tb.Fatal(err)
		}
		info, _ := f.Stat()
		ents, err := readPackHeader(f, info.Size())
		f.Close()
		if err != nil {
			tb.Fatalf("pack %s: %v", p, err)
		}
		for _, e := range ents {
			n += e.size
		}
	}
	return n
}

func mustRun(tb testing.TB, s *Store, ds []digest.Digest, bs [][]byte, cold bool) {
	tb.Helper()
	if err := s.PutVerifiedRun(ds, bs, cold); err != nil {
		tb.Fatalf("PutVerifiedRun: %v", err)
	}
}

func assertVerified(tb testing.TB, dir string, want int) {
	tb.Helper()
	n, bad, err := Verify(dir)
	if err != nil || len(bad) > 0 || n != want {
		tb.Errorf("Verify: %d chunks, bad %v, err %v; want %d sound chunks", n, bad, err, want)
	}
}

// TestPutRun: the small chunks of a run go into one pack, a large one and
// ones already stored do not; every chunk reads back, from the pack or
// its file, before and after a restart, with both ways of writing.
func TestPutRun(t *testing.T) {
	for _, rename := range []bool{false, true} {
		t.Run(fmt.Sprintf("rename=%v", rename), func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, Options{Dir: dir, MemoryBytes: -1})
			s.noTmpfile.Store(rename)
			ds, bs := run("r", 50)
			stored := mustPut(t, s, bs[7]) // on disk before the run
			big, bigD := chunk("big", PackMaxChunk+1)
			ds = append(ds, bigD, ds[3]) // and a chunk twice in the run
			bs = append(bs, big, bs[3])
			mustRun(t, s, ds, bs, true)

			var want int64
			for i, b := range bs[:51] {
				want += int64(len(b))
				if got, ok := s.Get(ds[i]); !ok || !bytes.Equal(got, b) {
					t.Fatalf("chunk %d (%s) not read back: %v", i, ds[i], ok)
				}
			}
			if s.Len() != 51 || s.Size() != want || diskBytes(t, dir) != want {
				t.Errorf("Len %d Size %d on disk %d; want 51 chunks of %d bytes", s.Len(), s.Size(), diskBytes(t, dir), want)
			}
			if files, packs := chunkFiles(t, dir), packFiles(t, dir); len(files) != 2 || len(packs) != 1 {
				t.Errorf("%d chunk files and %d packs; want 2 (the one stored before, the large one) and 1", len(files), len(packs))
			}
			if fs := chunkFiles(t, dir); len(fs) == 2 && fs[0] != s.path(stored) && fs[1] != s.path(stored) {
				t.Errorf("chunk stored before the run moved: %v", fs)
			}
			if ents, _ := os.ReadDir(filepath.Join(dir, tmpDir)); len(ents) != 0 {
				t.Errorf("temporary files left: %d", len(ents))
			}
			assertVerified(t, dir, 51)

			s.Close()
			s2 := openStore(t, Options{Dir: dir, MemoryBytes: -1})
			for i, b := range bs[:51] {
				if got, ok := s2.Get(ds[i]); !ok || !bytes.Equal(got, b) {
					t.Fatalf("chunk %d not read back after a restart: %v", i, ok)
				}
			}
			if s2.Len() != 51 || s2.Size() != want {
				t.Errorf("after a restart: Len %d Size %d; want 51, %d", s2.Len(), s2.Size(), want)
			}
		})
	}
}

// TestPutRunMemory: a run that is being read goes to memory too, with the
// store's own copy; a cold one does not.
func TestPutRunMemory(t *testing.T) {
	s := openStore(t, Options{})
	ds, bs := run("m", 4)
	mustRun(t, s, ds, bs, false)
	bs[0][0]++
	if got, ok := s.Get(ds[0]); !ok || digest.FromBytes(got) != ds[0] {
		t.Errorf("the store shares the caller's bytes")
	}
	cds, cbs := run("c", 4)
	mustRun(t, s, cds, cbs, true)
	for _, d := range cds {
		s.mu.Lock()
		_, inMem := s.mem[d]
		s.mu.Unlock()
		if inMem {
			t.Errorf("cold chunk %s in memory", d)
		}
	}
	if err := s.PutVerifiedRun([]digest.Digest{"sha256:nothex"}, [][]byte{{1}}, true); err == nil {
		t.Error("PutVerifiedRun took a malformed digest")
	}
	if err := s.PutVerifiedRun(cds[:2], cbs[:1], true); err == nil {
		t.Error("PutVerifiedRun took 2 digests for 1 chunk")
	}
}

// TestPackDamage: a chunk of a pack damaged on disk is not served; the
// pack goes whole (no file known bad is read again) and its chunks are
// misses, to be fetched again. Damaged and foreign files in the packs
// directory are removed on Open.
func TestPackDamage(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, Options{Dir: dir, MemoryBytes: -1})
	ds, bs := run("d", 20)
	mustRun(t, s, ds, bs, true)
	p := packFiles(t, dir)[0]
	f, _ := os.Open(p)
	info, _ := f.Stat()
	ents, err := readPackHeader(f, info.Size())
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(p)
	raw[ents[5].off+ents[5].size/2] ^= 0x40
	if err := os.WriteFile(p, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if got, ok := s.GetColdUnchecked(ds[5]); !ok || bytes.Equal(got, bs[5]) {
		t.Errorf("GetColdUnchecked: %v; want the damaged bytes as they are", ok)
	}
	if _, ok := s.Get(ds[5]); ok {
		t.Fatal("Get served a damaged chunk from a pack")
	}
	if st := s.Stats(); st.Corrupted != 1 {
		t.Errorf("Corrupted = %d, want 1", st.Corrupted)
	}
	if s.Len() != 0 || s.Size() != 0 || len(packFiles(t, dir)) != 0 {
		t.Errorf("after the damage: Len %d Size %d packs %d; want the pack gone whole", s.Len(), s.Size(), len(packFiles(t, dir)))
	}
	// Stored again, then cut short and joined by a stranger while the
	// daemon is down.
	mustRun(t, s, ds, bs, true)
	s.Close()
	p = packFiles(t, dir)[0]
	if err := os.Truncate(p, info.Size()-1); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, packDir, "stranger"), []byte("not a pack at all"), 0o600); err != nil {
		t.Fatal(err)
	}
	s2 := openStore(t, Options{Dir: dir, MemoryBytes: -1})
	if s2.Len() != 0 || s2.Size() != 0 || len(packFiles(t, dir)) != 0 {
		t.Errorf("Open kept a torn pack or a stranger: Len %d Size %d files %v", s2.Len(), s2.Size(), packFiles(t, dir))
	}
}

// TestPackEviction: a pack is evicted whole, its file removed; a pack
// with a pinned chunk stays; a layer's garbage collection frees a pack
// once none of its chunks is left.
func TestPackEviction(t *testing.T) {
	dir := t.TempDir()
	ads, abs := run("a", 10) // about 45 KiB a run
	bds, bbs := run("b", 10)
	cds, cbs := run("c", 10)
	s := openStore(t, Options{Dir: dir, MemoryBytes: -1, MaxBytes: 100 << 10})
	mustRun(t, s, ads, abs, true)
	mustRun(t, s, bds, bbs, true)
	s.Pin(bds[9:])
	for _, d := range ads { // b is now the least recently used
		s.Get(d)
	}
	mustRun(t, s, cds, cbs, true) // over the bound: b is pinned, a goes
	for _, d := range ads {
		if s.Has(d) {
			t.Fatalf("chunk %s of the least recently used unpinned pack kept", d)
		}
	}
	for _, d := range append(bds, cds...) {
		if !s.Has(d) {
			t.Fatalf("chunk %s of a pinned or new pack evicted", d)
		}
	}
	if got := len(packFiles(t, dir)); got != 2 || s.Size() != diskBytes(t, dir) {
		t.Errorf("%d packs, Size %d, on disk %d; want 2 packs, the index true to the disk", got, s.Size(), diskBytes(t, dir))
	}
	if st := s.Stats(); st.Evictions != 10 {
		t.Errorf("Evictions = %d, want the 10 chunks of one pack", st.Evictions)
	}

	// Garbage collection: part of a pack frees nothing, the rest frees it.
	if freed := s.Remove(cds[:4]); freed != 0 || len(packFiles(t, dir)) != 2 {
		t.Errorf("Remove of part of a pack freed %d bytes, %d packs left; want 0 and 2", freed, len(packFiles(t, dir)))
	}
	var cBytes int64
	for _, b := range cbs {
		cBytes += int64(len(b))
	}
	if freed := s.Remove(cds[4:]); freed != cBytes || len(packFiles(t, dir)) != 1 {
		t.Errorf("Remove of the rest freed %d bytes, %d packs left; want %d and 1", freed, len(packFiles(t, dir)), cBytes)
	}
	// A pinned chunk spares its pack from Remove as from eviction.
	if freed := s.Remove(bds); freed != 0 || !s.Has(bds[9]) {
		t.Errorf("Remove freed %d bytes of a pack with a pinned chunk", freed)
	}
	s.Unpin(bds[9:])
	if freed := s.Remove(bds[9:]); freed == 0 || len(packFiles(t, dir)) != 0 || s.Size() != 0 {
		t.Errorf("last chunk removed: freed %d, packs %d, Size %d; want the pack gone", freed, len(packFiles(t, dir)), s.Size())
	}
}

// TestPackConcurrentRuns: runs that share chunks, stored at once, index
// each chunk once, keep the index's size true to the disk, and restart
// to the same chunks.
func TestPackConcurrentRuns(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, Options{Dir: dir, MemoryBytes: -1})
	ds, bs := run("shared", 64)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			lo := g * 4
			if err := s.PutVerifiedRun(ds[lo:lo+32], bs[lo:lo+32], g%2 == 0); err != nil {
				t.Errorf("PutVerifiedRun: %v", err)
			}
		})
	}
	wg.Wait()
	n := 32 + 7*4
	if s.Len() != n || s.Size() != diskBytes(t, dir) {
		t.Errorf("Len %d Size %d on disk %d; want %d chunks and the index true to the disk", s.Len(), s.Size(), diskBytes(t, dir), n)
	}
	s.Close()
	s2 := openStore(t, Options{Dir: dir, MemoryBytes: -1})
	for i := range n {
		if got, ok := s2.Get(ds[i]); !ok || !bytes.Equal(got, bs[i]) {
			t.Errorf("chunk %d not read back after a restart", i)
		}
	}
	if s2.Len() != n || s2.Size() != diskBytes(t, dir) {
		t.Errorf("after a restart: Len %d Size %d on disk %d", s2.Len(), s2.Size(), diskBytes(t, dir))
	}
}

// FuzzPackHeader: any file in the packs directory is either refused or
// read as chunks that lie inside it, back to back, to its end.
func FuzzPackHeader(f *testing.F) {
	ds, bs := run("f", 3)
	h, _, _ := encodePackHeader(ds, bs)
	f.Add(append(h, bytes.Join(bs, nil)...))
	f.Add([]byte(packMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		ents, err := readPackHeader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		end := int64(packHeaderSize + len(ents)*packEntrySize)
		for _, e := range ents {
			if e.off != end || e.size > PackMaxChunk || e.d.Validate() != nil {
				t.Fatalf("entry %+v after %d", e, end)
			}
			end += e.size
		}
		if end != int64(len(b)) {
			t.Fatalf("entries end at %d of %d", end, len(b))
		}
	})
}

// TestPackListsChunkTwice: a pack whose header lists one chunk twice
// (written by no Store, but a disk can make anything) is indexed once and
// read back, its file kept while the chunk is.
func TestPackListsChunkTwice(t *testing.T) {
	dir := t.TempDir()
	b, d := chunk("twice", 3000)
	h, _, err := encodePackHeader([]digest.Digest{d, d}, [][]byte{b, b})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, packDir), 0o700); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, packDir, "twice")
	if err := os.WriteFile(p, append(append(h, b...), b...), 0o600); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, Options{Dir: dir, MemoryBytes: -1})
	if got, ok := s.Get(d); !ok || !bytes.Equal(got, b) || s.Len() != 1 || s.Size() != 6000 {
		t.Fatalf("Get %v, Len %d, Size %d; want the chunk once, 6000 bytes on disk", ok, s.Len(), s.Size())
	}
	if freed := s.Remove([]digest.Digest{d}); freed != 6000 || len(packFiles(t, dir)) != 0 {
		t.Errorf("Remove freed %d, packs %v; want 6000 and the file gone", freed, packFiles(t, dir))
	}
}

// TestPackDiskFull: a run that does not fit on the cache's disk (a 256 KiB
// tmpfs) fails with ENOSPC, leaves no pack or temporary file behind and
// nothing indexed for it, and the store keeps serving what it holds.
func TestPackDiskFull(t *testing.T) {
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=256k"); err != nil {
		t.Skipf("SKIP LOUDLY: cannot mount a small tmpfs for the cache (needs root): %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount tmpfs %s: %v", dir, err)
		}
	})
	for _, rename := range []bool{false, true} {
		t.Run(fmt.Sprintf("rename=%v", rename), func(t *testing.T) {
			sub := filepath.Join(dir, fmt.Sprint(rename))
			s := openStore(t, Options{Dir: sub, MemoryBytes: -1})
			s.noTmpfile.Store(rename)
			small, smallD := chunk("fits", 5000)
			mustPut(t, s, small)
			var ds []digest.Digest
			var bs [][]byte
			for i := range 80 { // 80 chunks of 4 KiB and more: over 256 KiB
				b, d := chunk(fmt.Sprint("full", rename, i), 4096+i)
				ds, bs = append(ds, d), append(bs, b)
			}
			err := s.PutVerifiedRun(ds, bs, true)
			if !errors.Is(err, unix.ENOSPC) {
				t.Fatalf("PutVerifiedRun on a full disk: %v; want ENOSPC", err)
			}
			for _, d := range ds {
				if s.Has(d) {
					t.Fatalf("chunk %s of a pack that did not fit is indexed", d)
				}
			}
			if ps := packFiles(t, sub); len(ps) != 0 {
				t.Errorf("packs left after ENOSPC: %v", ps)
			}
			if ents, _ := os.ReadDir(filepath.Join(sub, tmpDir)); len(ents) != 0 {
				t.Errorf("temporary files left after ENOSPC: %d", len(ents))
			}
			if got, ok := s.Get(smallD); !ok || !bytes.Equal(got, small) {
				t.Errorf("chunk stored before the disk filled not served: %v", ok)
			}
			assertVerified(t, sub, 1)
			s.Close()
			os.RemoveAll(sub)
		})
	}
}

// BenchmarkPutRun stores runs of 256 chunks of 4 KiB (a run of a layer of
// small files) into a fresh store: as a pack, and a file per chunk as
// before packs.
func BenchmarkPutRun(b *testing.B) {
	const n, size = 256, 4096
	for _, mode := range []string{"pack", "files"} {
		b.Run(mode, func(b *testing.B) {
			s := openStore(b, Options{MemoryBytes: -1})
			b.SetBytes(n * size)
			for i := 0; b.Loop(); i++ {
				b.StopTimer()
				ds, bs := make([]digest.Digest, n), make([][]byte, n)
				for k := range n {
					bs[k], ds[k] = chunk(fmt.Sprint(mode, i, "-", k), size)
				}
				b.StartTimer()
				if mode == "pack" {
					if err := s.PutVerifiedRun(ds, bs, true); err != nil {
						b.Fatal(err)
					}
					continue
				}
				for k := range n {
					if err := s.PutVerified(ds[k], bs[k], true); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// TestPutRunKeepsNoBuffer: the caller of PutVerifiedRun reuses its
// buffers once it returns (fs recycles the buffers background runs are
// decoded into): what is stored, in memory and on disk, does not change
// when they are overwritten.
func TestPutRunKeepsNoBuffer(t *testing.T) {
	s := openStore(t, Options{Dir: t.TempDir()})
	ds, bs := run("reuse", 8)
	big, bigD := chunk("reuse-big", PackMaxChunk+1)
	ds, bs = append(ds, bigD), append(bs, big)
	want := make([][]byte, len(bs))
	for i, b := range bs {
		want[i] = bytes.Clone(b)
	}
	mustRun(t, s, ds, bs, false) // warm: the memory tier too
	for _, b := range bs {
		clear(b)
	}
	for i, d := range ds {
		got, ok := s.Get(d)
		if !ok || !bytes.Equal(got, want[i]) {
			t.Fatalf("chunk %d changed when the caller reused its buffer (found %v)", i, ok)
		}
	}
	// From disk (no memory tier), packed or not, into one buffer.
	d2 := openStore(t, Options{Dir: t.TempDir(), MemoryBytes: -1})
	mustRun(t, d2, ds, want, true)
	buf := make([]byte, PackMaxChunk+1)
	for i, d := range ds {
		got, ok := d2.ReadColdUnchecked(d, buf)
		if !ok || !bytes.Equal(got, want[i]) {
			t.Fatalf("chunk %d read from disk into a buffer: wrong bytes (found %v)", i, ok)
		}
		if &got[0] != &buf[0] {
			t.Errorf("chunk %d read into a new slice, not the buffer given", i)
		}
	}
}
