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

// benchRegistry is a registry on loopback and a client of one repository
// in it, for the benchmarks of the background fetch.
type benchRegistry struct {
	client *fetcher.Client
	ref    fetcher.Ref
	log    *logrus.Entry
}

func newBenchRegistry(b *testing.B, repo string) *benchRegistry {
	b.Helper()
	reg := testenv.Registry(b, testenv.RegistryOptions{})
	client, err := fetcher.New(fetcher.Options{Retries: -1, Timeout: 30 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	ref, err := fetcher.ParseRef(reg.Host + "/" + repo)
	if err != nil {
		b.Fatal(err)
	}
	log := logrus.NewEntry(logrus.New())
	log.Logger.SetLevel(logrus.WarnLevel)
	return &benchRegistry{client: client, ref: ref, log: log}
}

// benchNode is a cache, a Manager and the registry's scheduler pool, in a
// fresh directory.
type benchNode struct {
	r     *benchRegistry
	store *cache.Store
	m     *Manager
	sched *scheduler
	pool  *hostPool
}

func (r *benchRegistry) node(b *testing.B) *benchNode {
	b.Helper()
	dir := b.TempDir()
	store, err := cache.Open(cache.Options{Dir: filepath.Join(dir, "cache"), MaxBytes: 1 << 30, MemoryBytes: -1})
	if err != nil {
		b.Fatal(err)
	}
	m := &Manager{opts: ManagerOptions{Root: dir, Cache: store}, log: r.log}
	os.MkdirAll(recordDir(dir), 0o700)
	sched := newScheduler(schedulerOptions{fgConcurrency: 8, bgConcurrency: 4, maxCoalesce: 4 << 20, background: true, cache: store, log: r.log})
	return &benchNode{r: r, store: store, m: m, sched: sched, pool: sched.pool(r.ref.Host)}
}

// reader reads blob for a layer counting into st (nil: none).
func (n *benchNode) reader(blob digest.Digest, st *layerStats) *remoteReader {
	r := n.r
	return &remoteReader{src: r.client, ref: r.ref, blob: blob, cache: n.store, host: n.pool, maxCoalesce: 4 << 20, log: r.log, stats: &n.m.stats, layer: st}
}

// layer is a mounted layer of toc, its streaming blob being blob, and its
// background job (not started).
func (n *benchNode) layer(toc *artifact.TOC, blob digest.Digest) (*layerState, *layerJob) {
	st := &layerState{m: n.m, layer: toc.Layer, rec: layerRecord{Ref: n.r.ref.String()}, toc: toc, log: n.r.log, pool: n.pool}
	st.reader = n.reader(blob, &st.stats)
	return st, newLayerJob(st, false, true, 4<<20, 0)
}

func (n *benchNode) close() {
	n.sched.close()
	n.store.Close()
}

// BenchmarkOnDemandLatencyWithBackground measures on-demand chunk reads
// (one 64 KiB chunk per read, through the remoteReader's on-demand path,
// against a real registry on loopback) with no background work, and while
// the scheduler fetches another large layer in the background. Variants
// with a pause between reads let background work resume between them,
// the worst case for a read arriving while background runs are in flight.
func BenchmarkOnDemandLatencyWithBackground(b *testing.B) {
	r := newBenchRegistry(b, "bench/layers:v1")
	small, smallBlob := benchBlob(b, r.client, r.ref, 1, 256, 64<<10)
	big, bigBlob := benchBlob(b, r.client, r.ref, 2, 160, 1<<20)

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
			n := r.node(b)
			defer n.close()
			m := n.m
			onDemand := n.reader(smallBlob, nil)
			if tc.background {
				st, job := n.layer(big, bigBlob)
				n.pool.add(job)
				defer job.stop(n.pool)
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
	r := newBenchRegistry(b, "bench/complete:v1")
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
		tc.toc, tc.blob = benchBlob(b, r.client, r.ref, tc.seed, tc.n, tc.size)
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				n := r.node(b)
				st, job := n.layer(tc.toc, tc.blob)
				b.StartTimer()
				n.pool.add(job)
				deadline := time.Now().Add(2 * time.Minute)
				for !st.complete.Load() && !st.bad.Load() && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
				b.StopTimer()
				if !st.complete.Load() {
					b.Fatalf("layer not complete after 2 min (bad: %v)", st.bad.Load())
				}
				job.stop(n.pool)
				n.close()
				b.StartTimer()
			}
			b.SetBytes(int64(tc.n * tc.size))
		})
	}
}
