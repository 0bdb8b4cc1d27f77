package artifact

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"sort"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// EncodeTOC writes t as zstd-compressed JSON.
func EncodeTOC(w io.Writer, t *TOC) error {
	zw, err := zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err != nil {
		return fmt.Errorf("encode TOC: %w", err)
	}
	if err := json.NewEncoder(zw).Encode(t); err != nil {
		zw.Close()
		return fmt.Errorf("encode TOC: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("encode TOC: %w", err)
	}
	return nil
}

// DecodeTOC reads a zstd-compressed JSON TOC from r and validates it
// against lim. Allocation is bounded by lim whatever r holds.
func DecodeTOC(r io.Reader, lim Limits) (*TOC, error) {
	lim = lim.withDefaults()
	zr, err := zstd.NewReader(r, zstd.WithDecoderMaxMemory(uint64(lim.MaxTOCBytes)), zstd.WithDecoderConcurrency(1))
	if err != nil {
		return nil, fmt.Errorf("%w: open zstd: %v", ErrInvalidTOC, err)
	}
	defer zr.Close()
	lr := &io.LimitedReader{R: zr, N: lim.MaxTOCBytes + 1}
	dec := json.NewDecoder(lr)
	dec.DisallowUnknownFields()
	var t TOC
	if err := dec.Decode(&t); err != nil {
		if lr.N <= 0 {
			return nil, fmt.Errorf("%w: larger than %d bytes uncompressed", ErrInvalidTOC, lim.MaxTOCBytes)
		}
		return nil, fmt.Errorf("%w: decode JSON: %v", ErrInvalidTOC, err)
	}
	if err := t.Validate(lim); err != nil {
		return nil, err
	}
	return &t, nil
}

// ChunkRange returns the indexes [first, last) of the chunks that hold the
// uncompressed tar bytes [off, off+n). Chunks must be valid (see Validate).
func (t *TOC) ChunkRange(off, n int64) (first, last int) {
	if n <= 0 || len(t.Chunks) == 0 {
		return 0, 0
	}
	first = sort.Search(len(t.Chunks), func(i int) bool {
		c := t.Chunks[i]
		return c.Offset+c.Size > off
	})
	last = sort.Search(len(t.Chunks), func(i int) bool {
		return t.Chunks[i].Offset >= off+n
	})
	return first, last
}

// DecodeChunk decompresses one chunk's frame and verifies the result
// against the chunk's digest. It never returns unverified bytes.
func DecodeChunk(c Chunk, frame []byte) ([]byte, error) {
	if int64(len(frame)) != c.CompressedSize {
		return nil, fmt.Errorf("chunk at %d: got %d compressed bytes, want %d", c.Offset, len(frame), c.CompressedSize)
	}
	out := make([]byte, 0, c.Size)
	out, err := chunkDecoder.DecodeAll(frame, out)
	if err != nil {
		return nil, fmt.Errorf("decompress chunk at %d: %w", c.Offset, err)
	}
	if int64(len(out)) != c.Size {
		return nil, fmt.Errorf("chunk at %d: %w: decompressed to %d bytes, want %d", c.Offset, ErrDigestMismatch, len(out), c.Size)
	}
	if got := digest.FromBytes(out); got != c.Digest {
		return nil, fmt.Errorf("chunk at %d: %w: got %s, want %s", c.Offset, ErrDigestMismatch, got, c.Digest)
	}
	return out, nil
}

// chunkDecoder is shared: DecodeAll is safe for concurrent use.
var chunkDecoder, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxChunkSize+1))

// Marshal encodes t and returns the bytes with their digest.
func (t *TOC) Marshal() ([]byte, digest.Digest, error) {
	var buf bytes.Buffer
	if err := EncodeTOC(&buf, t); err != nil {
		return nil, "", err
	}
	return buf.Bytes(), digest.FromBytes(buf.Bytes()), nil
}
