package fs

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/cache"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/internal/testenv"
)

// benchBlob makes a streaming blob of n chunks of size random bytes, each
// its own zstd frame, and pushes it.
func benchBlob(b *testing.B, c *fetcher.Client, ref fetcher.Ref, seed uint64, n int, size int) (*artifact.TOC, digest.Digest) {
	b.Helper()
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, seed))
	toc := &artifact.TOC{Version: artifact.TOCVersion, ChunkSize: int64(size)}
	var blob bytes.Buffer
	tar := digest.SHA256.Digester()
	raw := make([]byte, size)
	for i := range n {
		for k := range raw {
			raw[k] = byte(rng.Uint32())
		}
		frame := enc.EncodeAll(raw, nil)
		toc.Chunks = append(toc.Chunks, artifact.Chunk{
			Offset: int64(i * size), Size: int64(size),
			CompressedOffset: int64(blob.Len()), CompressedSize: int64(len(frame)),
			Digest: digest.FromBytes(raw),
		})
		tar.Hash().Write(raw)
		blob.Write(frame)
	}
	toc.TarSize, toc.BlobSize, toc.DiffID = int64(n*size), int64(blob.Len()), tar.Digest()
	d := digest.FromBytes(blob.Bytes())
	toc.Layer = d
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.PushBlob(ctx, ref, ocispec.Descriptor{MediaType: artifact.MediaTypeStreamingLayer, Digest: d, Size: int64(blob.Len())}, bytes.NewReader(blob.Bytes())); err != nil {
		b.Fatal(err)
	}
	return toc, d
}

// BenchmarkOnDemandLatencyWithBackground measures on-demand chunk reads
// (one 64 KiB chunk per read, through the remoteReader's on-demand path,
// against a real registry on loopback) with no background work, and while
// the scheduler fetches another large layer in the background. Variants
// with a pause between reads let background work resume between them,
// the worst case for a read arriving while background runs are in flight.
func BenchmarkOnDemandLatencyWithBackground(b *testing.B) {
	reg := testenv.Registry(b, testenv.RegistryOptions{})
	client, err := fetcher.New(fetcher.Options{Retries: -1, Timeout: 30 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	ref, err := fetcher.ParseRef(reg.Host + "/bench/layers:v1")
	if err != nil {
		b.Fatal(err)
	}
	small, smallBlob := benchBlob(b, client, ref, 1, 256, 64<<10)
	big, bigBlob := benchBlob(b, client, ref, 2, 160, 1<<20)
	log := logrus.NewEntry(logrus.New())
	log.Logger.SetLevel(logrus.WarnLevel)

	for _, tc := range []struct {
		name       string
		background bool
		gap        time.Duration
	}{
		{"idle", false, 0},
		{"background", true, 0},
		{"idle-gap50ms", false, 50 * time.Millisecond},
		{"background-gap50ms", true, 50 * time.Millisecond},
	} {
		b.Run(tc.name, func(b *testing.B) {
			dir := b.TempDir()
			store, err := cache.Open(cache.Options{Dir: filepath.Join(dir, "cache"), MaxBytes: 1 << 30, MemoryBytes: -1})
			if err != nil {
				b.Fatal(err)
			}
			defer store.Close()
			m := &Manager{opts: ManagerOptions{Root: dir, Cache: store}, log: log}
			os.MkdirAll(recordDir(dir), 0o700)
			sched := newScheduler(schedulerOptions{fgConcurrency: 8, bgConcurrency: 4, maxCoalesce: 4 << 20, background: true, cache: store, log: log})
			defer sched.close()
			pool := sched.pool(ref.Host)
			reader := func(blob digest.Digest, st *layerStats) *remoteReader {
				return &remoteReader{src: client, ref: ref, blob: blob, cache: store, host: pool, maxCoalesce: 4 << 20, log: log, stats: &m.stats, layer: st}
			}
			onDemand := reader(smallBlob, nil)
			var job *layerJob
			if tc.background {
				st := &layerState{m: m, layer: big.Layer, rec: layerRecord{Ref: ref.String()}, toc: big, log: log, pool: pool}
				st.reader = reader(bigBlob, &st.stats)
				job = newLayerJob(st, false, true, 4<<20, 0)
				pool.add(job)
				defer job.stop(pool)
				// Let the background workers get going.
				deadline := time.Now().Add(5 * time.Second)
				for st.stats.fetched.Load() == 0 && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
			}
			ctx := context.Background()
			bgBefore := m.stats.byCause[causeBackground].Load()
			start := time.Now()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if tc.gap > 0 {
					b.StopTimer()
					time.Sleep(tc.gap)
					b.StartTimer()
				}
				c := small.Chunks[i%len(small.Chunks)]
				if _, err := onDemand.fetchRun(ctx, []artifact.Chunk{c}, causeOnDemand); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if tc.background {
				mb := float64(m.stats.byCause[causeBackground].Load()-bgBefore) / (1 << 20)
				b.ReportMetric(mb/time.Since(start).Seconds(), "bgMB/s")
			}
		})
	}
}

// BenchmarkBackgroundComplete measures how long the background fetch
// takes to bring a whole layer into the cache and verify it, from a real
// registry on loopback: the same 64 MiB as 64 chunks of 1 MiB (few large
// files) and as 16384 chunks of 4 KiB (a base layer of many small files,
// each file its own chunk).
func BenchmarkBackgroundComplete(b *testing.B) {
	reg := testenv.Registry(b, testenv.RegistryOptions{})
	client, err := fetcher.New(fetcher.Options{Retries: -1, Timeout: 30 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	ref, err := fetcher.ParseRef(reg.Host + "/bench/complete:v1")
	if err != nil {
		b.Fatal(err)
	}
	log := logrus.NewEntry(logrus.New())
	log.Logger.SetLevel(logrus.WarnLevel)
	for _, tc := range []struct {
		name    string
		n, size int
		seed    uint64
		toc     *artifact.TOC
		blob    digest.Digest
	}{
		{name: "1MiB-chunks", n: 64, size: 1 << 20, seed: 3},
		{name: "4KiB-chunks", n: 16384, size: 4 << 10, seed: 4},
	} {
		tc.toc, tc.blob = benchBlob(b, client, ref, tc.seed, tc.n, tc.size)
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				dir := b.TempDir()
				store, err := cache.Open(cache.Options{Dir: filepath.Join(dir, "cache"), MaxBytes: 1 << 30, MemoryBytes: -1})
				if err != nil {
					b.Fatal(err)
				}
				m := &Manager{opts: ManagerOptions{Root: dir, Cache: store}, log: log}
				os.MkdirAll(recordDir(dir), 0o700)
				sched := newScheduler(schedulerOptions{fgConcurrency: 8, bgConcurrency: 4, maxCoalesce: 4 << 20, background: true, cache: store, log: log})
				pool := sched.pool(ref.Host)
				st := &layerState{m: m, layer: tc.toc.Layer, rec: layerRecord{Ref: ref.String()}, toc: tc.toc, log: log, pool: pool}
				st.reader = &remoteReader{src: client, ref: ref, blob: tc.blob, cache: store, host: pool, maxCoalesce: 4 << 20, log: log, stats: &m.stats, layer: &st.stats}
				job := newLayerJob(st, false, true, 4<<20, 0)
				b.StartTimer()
				pool.add(job)
				deadline := time.Now().Add(2 * time.Minute)
				for !st.complete.Load() && !st.bad.Load() && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
				b.StopTimer()
				if !st.complete.Load() {
					b.Fatalf("layer not complete after 2 min (bad: %v)", st.bad.Load())
				}
				job.stop(pool)
				sched.close()
				store.Close()
				b.StartTimer()
			}
			b.SetBytes(int64(tc.n * tc.size))
		})
	}
}
