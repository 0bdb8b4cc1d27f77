package fs_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fs"
)

// cachedReader serves chunks already held in memory: a layer whose chunks
// are all in the cache.
type cachedReader struct{ chunks map[int64][]byte }

func (r *cachedReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	d, ok := r.chunks[c.Offset]
	if !ok {
		return nil, fmt.Errorf("chunk at %d not cached", c.Offset)
	}
	return d, nil
}

// bigFileLayer builds, without a tar, a layer holding one file of size
// bytes in 1 MiB chunks, its chunks in memory, and the same bytes.
func bigFileLayer(size int64) (*artifact.TOC, *cachedReader, []byte) {
	const chunk = artifact.DefaultChunkSize
	data := make([]byte, size)
	rand.NewChaCha8([32]byte{1}).Read(data)
	toc := &artifact.TOC{Version: artifact.TOCVersion, Layer: "sha256:bench", ChunkSize: chunk, TarSize: 512 + size + 1024}
	toc.Entries = []artifact.Entry{{Name: "big", Type: artifact.TypeReg, Mode: 0o644, Offset: 512, Size: size, ModTime: time.Now()}}
	r := &cachedReader{chunks: map[int64][]byte{}}
	addChunk := func(off int64, b []byte) {
		toc.Chunks = append(toc.Chunks, artifact.Chunk{Offset: off, Size: int64(len(b))})
		r.chunks[off] = b
	}
	addChunk(0, make([]byte, 512))
	for off := int64(0); off < size; off += chunk {
		addChunk(512+off, data[off:min(off+chunk, size)])
	}
	addChunk(512+size, make([]byte, 1024))
	return toc, r, data
}

// benchFileSize is 1 GiB unless STREAMER_BENCH_FILE_MB says otherwise.
func benchFileSize(b *testing.B) int64 {
	if s := os.Getenv("STREAMER_BENCH_FILE_MB"); s != "" {
		mb, err := strconv.Atoi(s)
		if err != nil || mb <= 0 {
			b.Fatalf("STREAMER_BENCH_FILE_MB=%q: want a positive number", s)
		}
		return int64(mb) << 20
	}
	return 1 << 30
}

// openTargets opens the same file on local disk, through the mount, and
// through the mount bypassing the page cache (O_DIRECT: every read reaches
// the filesystem, which finds the chunk in memory).
func openTargets(b *testing.B, size int64) map[string]*os.File {
	toc, r, data := bigFileLayer(size)
	diskPath := filepath.Join(b.TempDir(), "big")
	if err := os.WriteFile(diskPath, data, 0o644); err != nil {
		b.Fatal(err)
	}
	mnt, _ := mountLayer(b, toc, r, fs.Options{})
	files := map[string]*os.File{}
	open := func(name, p string, flag int) {
		f, err := os.OpenFile(p, os.O_RDONLY|flag, 0)
		if err != nil {
			b.Fatalf("open %s: %v", name, err)
		}
		b.Cleanup(func() { f.Close() })
		files[name] = f
	}
	open("disk", diskPath, 0)
	open("fuse", filepath.Join(mnt, "big"), 0)
	open("fuse-direct", filepath.Join(mnt, "big"), unix.O_DIRECT)
	return files
}

// warm reads f whole once so that its pages are in the page cache; O_DIRECT
// targets bypass that cache and are left alone.
func warm(b *testing.B, name string, f *os.File, size int64) {
	if strings.HasSuffix(name, "-direct") {
		return
	}
	buf := alignedBuf(1 << 20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := f.ReadAt(buf, off); err != nil && off+int64(len(buf)) <= size {
			b.Fatalf("warm %s: %v", name, err)
		}
	}
}

// alignedBuf returns a page-aligned buffer, as O_DIRECT wants.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&b[0]))%4096)
	return b[off%4096 : off%4096+n]
}

func BenchmarkReadVsDisk(b *testing.B) {
	requireFUSE(b)
	size := benchFileSize(b)
	files := openTargets(b, size)
	results := map[string]float64{}
	targets := []string{"disk", "fuse", "fuse-direct"}

	for _, name := range targets {
		b.Run("seq-1MiB/"+name, func(b *testing.B) {
			f := files[name]
			warm(b, name, f, size)
			buf := alignedBuf(1 << 20)
			b.SetBytes(int64(len(buf)))
			off := int64(0)
			for b.Loop() {
				if off+int64(len(buf)) > size {
					off = 0
				}
				if _, err := f.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
				off += int64(len(buf))
			}
			mbps := float64(b.N) * float64(len(buf)) / b.Elapsed().Seconds() / 1e6
			results["seq/"+name] = mbps
		})
	}
	for _, name := range targets {
		b.Run("rand-4KiB/"+name, func(b *testing.B) {
			f := files[name]
			warm(b, name, f, size)
			buf := alignedBuf(4096)
			pages := size / 4096
			rng := rand.New(rand.NewPCG(1, 2))
			b.SetBytes(4096)
			for b.Loop() {
				if _, err := f.ReadAt(buf, rng.Int64N(pages)*4096); err != nil {
					b.Fatal(err)
				}
			}
			ops := float64(b.N) / b.Elapsed().Seconds()
			b.ReportMetric(ops, "ops/s")
			results["rand/"+name] = ops
		})
	}
	b.Logf("file %d MiB: sequential 1 MiB reads disk %.0f MB/s, fuse %.0f MB/s (%.2fx), fuse O_DIRECT %.0f MB/s (%.2fx)",
		size>>20, results["seq/disk"], results["seq/fuse"], results["seq/fuse"]/results["seq/disk"],
		results["seq/fuse-direct"], results["seq/fuse-direct"]/results["seq/disk"])
	b.Logf("random 4 KiB reads disk %.0f ops/s, fuse %.0f ops/s (%.2fx), fuse O_DIRECT %.0f ops/s (%.2fx)",
		results["rand/disk"], results["rand/fuse"], results["rand/fuse"]/results["rand/disk"],
		results["rand/fuse-direct"], results["rand/fuse-direct"]/results["rand/disk"])
}

// manyFilesTOC builds, without a tar, a layer of n empty files in
// directories of 1,000.
func manyFilesTOC(n int) *artifact.TOC {
	toc := &artifact.TOC{Version: artifact.TOCVersion, Layer: "sha256:many", TarSize: int64(n+1) * 512 * 2}
	now := time.Now()
	for d := 0; d*1000 < n; d++ {
		toc.Entries = append(toc.Entries, artifact.Entry{Name: fmt.Sprintf("d%03d", d), Type: artifact.TypeDir, Mode: 0o755, ModTime: now})
		for i := d * 1000; i < min(n, (d+1)*1000); i++ {
			toc.Entries = append(toc.Entries, artifact.Entry{
				Name: fmt.Sprintf("d%03d/file-with-a-typical-name-%06d.so", d, i), Type: artifact.TypeReg,
				Mode: 0o644, UID: 1000, GID: 1000, ModTime: now,
			})
		}
	}
	toc.Chunks = []artifact.Chunk{{Offset: 0, Size: toc.TarSize}}
	return toc
}

func statAll(b *testing.B, root string, toc *artifact.TOC) {
	var st unix.Stat_t
	for _, e := range toc.Entries {
		if err := unix.Lstat(root+"/"+e.Name, &st); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkStat10k(b *testing.B) {
	requireFUSE(b)
	const n = 10_000
	toc := manyFilesTOC(n)
	disk := b.TempDir()
	for _, e := range toc.Entries {
		p := filepath.Join(disk, e.Name)
		var err error
		if e.Type == artifact.TypeDir {
			err = os.Mkdir(p, 0o755)
		} else {
			err = os.WriteFile(p, nil, 0o644)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	r := &cachedReader{}
	mnt, _ := mountLayer(b, toc, r, fs.Options{})
	statAll(b, mnt, toc) // warm the kernel's dentry and attribute caches

	b.Run("disk-warm", func(b *testing.B) {
		for b.Loop() {
			statAll(b, disk, toc)
		}
		b.ReportMetric(float64(b.N*len(toc.Entries))/b.Elapsed().Seconds(), "stats/s")
	})
	b.Run("fuse-warm", func(b *testing.B) {
		for b.Loop() {
			statAll(b, mnt, toc)
		}
		b.ReportMetric(float64(b.N*len(toc.Entries))/b.Elapsed().Seconds(), "stats/s")
	})
	b.Run("fuse-cold", func(b *testing.B) {
		// A fresh mount each time: every name is looked up through FUSE.
		var elapsed time.Duration
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			dir := filepath.Join(b.TempDir(), "mnt")
			if err := os.Mkdir(dir, 0o755); err != nil {
				b.Fatal(err)
			}
			m, err := fs.Mount(dir, toc, r, fs.Options{Logger: quietLogger()})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { m.Unmount() })
			b.StartTimer()
			start := time.Now()
			statAll(b, m.Mountpoint(), toc)
			elapsed += time.Since(start)
			b.StopTimer()
			if err := m.Unmount(); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		b.ReportMetric(float64(b.N*len(toc.Entries))/elapsed.Seconds(), "stats/s")
	})
}

// vmRSS returns the process's resident set size in bytes.
func vmRSS(b *testing.B) uint64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return kb << 10
		}
	}
	b.Fatal("no VmRSS in /proc/self/status")
	return 0
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// BenchmarkMemory100k reports the memory a mounted 100,000-file layer
// costs: its TOC, and the filesystem built from it, after every file was
// stat'ed once.
func BenchmarkMemory100k(b *testing.B) {
	requireFUSE(b)
	const n = 100_000
	for b.Loop() {
		b.StopTimer()
		before, rssBefore := heapInUse(), vmRSS(b)
		toc := manyFilesTOC(n)
		withTOC := heapInUse()
		mnt, m := mountLayer(b, toc, &cachedReader{}, fs.Options{})
		statAll(b, mnt, toc)
		mounted, rss := heapInUse(), vmRSS(b)
		b.ReportMetric(float64(withTOC-before)/(1<<20), "toc-heap-MiB")
		b.ReportMetric(float64(mounted-withTOC)/(1<<20), "fs-heap-MiB")
		b.ReportMetric(float64(mounted-withTOC)/float64(len(toc.Entries)), "fs-heap-B/entry")
		b.ReportMetric(float64(rss)/(1<<20), "rss-MiB")
		b.ReportMetric(float64(rss-rssBefore)/(1<<20), "rss-growth-MiB")
		if err := m.Unmount(); err != nil {
			b.Fatal(err)
		}
		runtime.KeepAlive(toc)
		b.StartTimer()
	}
}
