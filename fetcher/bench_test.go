package fetcher

import (
	"bytes"
	"context"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/internal/testenv"
)

// BenchmarkReadRange measures the lazy-pull hot path: 1 MiB range reads of
// one blob from a real registry with bearer-token auth, in parallel.
func BenchmarkReadRange(b *testing.B) {
	reg := testenv.Registry(b, testenv.RegistryOptions{Token: true})
	c, err := New(Options{DockerConfig: b.TempDir() + "/config.json"})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	ref := Ref{Host: reg.Host, Repository: "bench", Tag: "latest"}
	data := make([]byte, 16<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	desc := ocispec.Descriptor{MediaType: "application/octet-stream", Digest: digest.FromBytes(data), Size: int64(len(data))}
	if err := c.PushBlob(ctx, ref, desc, bytes.NewReader(data)); err != nil {
		b.Fatal(err)
	}
	const n = 1 << 20
	b.SetBytes(n)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int64(0)
		for pb.Next() {
			off := (i * n) % int64(len(data))
			if _, err := c.ReadRange(ctx, ref, desc.Digest, off, n); err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(reg.TokenRequests()), "token-requests")
}
