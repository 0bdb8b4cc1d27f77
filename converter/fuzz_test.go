package converter

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// FuzzTarReader feeds arbitrary bytes to ConvertLayer. It must never
// panic, and whatever it accepts must round-trip byte for byte.
// Seeds live in testdata/fuzz/FuzzTarReader.
func FuzzTarReader(f *testing.F) {
	f.Add([]byte{})
	f.Add(make([]byte, 1024))
	f.Fuzz(func(t *testing.T, input []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var blob bytes.Buffer
		res, err := ConvertLayer(ctx, bytes.NewReader(input), &blob, LayerOptions{ChunkSize: testChunk, Concurrency: 2})
		if err != nil {
			if !errors.Is(err, ErrBadTar) {
				t.Fatalf("error does not wrap ErrBadTar: %v", err)
			}
			return
		}
		if res.DiffID != digest.FromBytes(input) {
			t.Fatalf("DiffID %s, want %s", res.DiffID, digest.FromBytes(input))
		}
		zr, err := zstd.NewReader(&blob)
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		got, err := io.ReadAll(zr)
		if err != nil || !bytes.Equal(got, input) {
			t.Fatalf("blob does not decompress to the input (err %v)", err)
		}
	})
}
