package converter

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"go/build"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/streamer-dev/streamer/artifact"
)

// syntheticLayer streams a tar of about size bytes of files of mixed sizes
// (1 KiB to 16 MiB), half compressible text and half random bytes,
// generated on the fly: nothing but a 1 MiB buffer is held in memory.
func syntheticLayer(size int64, seed uint64) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() {
		rng := rand.New(rand.NewPCG(seed, seed+1))
		var chacha [32]byte
		random := rand.NewChaCha8(chacha)
		text := fileData(rng, 1<<20, true)
		buf := make([]byte, 1<<20)
		tw := tar.NewWriter(pw)
		var written int64
		for i := 0; written < size; i++ {
			n := int64(1<<10) << rng.IntN(15) // 1 KiB .. 16 MiB, log-uniform
			n += rng.Int64N(n)
			n = min(n, size-written)
			compressible := i%2 == 0
			h := &tar.Header{Name: fmt.Sprintf("dir%d/file%d", i%50, i), Typeflag: tar.TypeReg, Mode: 0o644, Size: n, ModTime: baseTime}
			if err := tw.WriteHeader(h); err != nil {
				pw.CloseWithError(err)
				return
			}
			for left := n; left > 0; {
				k := min(left, int64(len(buf)))
				if compressible {
					off := rng.IntN(len(text) - int(k) + 1)
					copy(buf[:k], text[off:])
				} else {
					random.Read(buf[:k])
				}
				if _, err := tw.Write(buf[:k]); err != nil {
					pw.CloseWithError(err)
					return
				}
				left -= k
			}
			written += n + 512
		}
		pw.CloseWithError(tw.Close())
	}()
	return pr
}

// countingWriter counts and drops what it is given.
type countingWriter struct{ n int64 }

func (w *countingWriter) Write(b []byte) (int, error) { w.n += int64(len(b)); return len(b), nil }

// countingReader counts what passes through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}

// heapPeak samples the live heap until stop is called and returns its
// peak in MiB.
func heapPeak() (stop func() float64) {
	runtime.GC()
	var peak atomic.Uint64
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > peak.Load() {
				peak.Store(ms.HeapAlloc)
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() float64 {
		close(done)
		wg.Wait()
		return float64(peak.Load()) / (1 << 20)
	}
}

// BenchmarkConvertLayer1GiB converts a 1 GiB layer streamed from a
// generator and reports throughput, compression ratio and peak heap.
func BenchmarkConvertLayer1GiB(b *testing.B) {
	const size = 1 << 30
	var peak, ratio float64
	var tarBytes int64
	var cpu time.Duration
	for i := 0; b.Loop(); i++ {
		src := &countingReader{r: syntheticLayer(size, uint64(i))}
		var blob countingWriter
		stop := heapPeak()
		cpu0 := cpuTime()
		res, err := ConvertLayer(context.Background(), src, &blob, LayerOptions{})
		cpu += cpuTime() - cpu0
		peak = max(peak, stop())
		if err != nil {
			b.Fatal(err)
		}
		tarBytes = src.n
		ratio = float64(res.TOC.TarSize) / float64(res.TOC.BlobSize)
	}
	b.SetBytes(tarBytes)
	b.ReportMetric(peak, "peak-heap-MiB")
	b.ReportMetric(ratio, "ratio")
	// Throughput per CPU second does not depend on what else the machine runs.
	b.ReportMetric(float64(tarBytes)*float64(b.N)/1e6/cpu.Seconds(), "MB/cpu-s")
}

// cpuTime is the process's user plus system CPU time (the generator's
// included).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// corpusTar writes a tar of up to limit bytes of the Go distribution's
// files (source, binaries, test data): a realistic mix of compressible
// and incompressible content that every machine running this has.
func corpusTar(b *testing.B, limit int64) string {
	b.Helper()
	root := build.Default.GOROOT
	p := filepath.Join(b.TempDir(), "corpus.tar")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	var total int64
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || total >= limit {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if !info.Mode().IsRegular() && !info.IsDir() {
			return nil
		}
		h, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		h.Name = filepath.ToSlash(rel)
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			src, err := os.Open(path)
			if err != nil {
				return err
			}
			defer src.Close()
			n, err := io.Copy(tw, src)
			total += n
			return err
		}
		return nil
	})
	if err == nil {
		err = tw.Close()
	}
	if err != nil {
		b.Fatalf("build corpus tar from %s: %v", root, err)
	}
	return p
}

// BenchmarkChunkSize measures, on a real file mix, how the chunk size
// trades compression ratio, TOC size and throughput.
func BenchmarkChunkSize(b *testing.B) {
	corpus := corpusTar(b, 256<<20)
	input, err := os.ReadFile(corpus)
	if err != nil {
		b.Fatal(err)
	}
	for _, cs := range []int64{256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20} {
		b.Run(fmt.Sprintf("%dKiB", cs>>10), func(b *testing.B) {
			var res *LayerResult
			cpu0 := cpuTime()
			for b.Loop() {
				var blob countingWriter
				res, err = ConvertLayer(context.Background(), bytes.NewReader(input), &blob, LayerOptions{ChunkSize: cs})
				if err != nil {
					b.Fatal(err)
				}
			}
			cpu := cpuTime() - cpu0
			b.SetBytes(int64(len(input)))
			b.ReportMetric(float64(len(input))*float64(b.N)/1e6/cpu.Seconds(), "MB/cpu-s")
			res.TOC.Layer = res.DiffID
			var toc countingWriter
			if err := artifact.EncodeTOC(&toc, res.TOC); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(res.TOC.TarSize)/float64(res.TOC.BlobSize), "ratio")
			b.ReportMetric(float64(len(res.TOC.Chunks)), "chunks")
			b.ReportMetric(float64(toc.n)/1024, "toc-KiB")
		})
	}
}
