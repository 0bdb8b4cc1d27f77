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
	dec := json.NewDecoder(newSpaceSqueezer(lr))
	dec.DisallowUnknownFields()
	var t TOC
	if err := decodeTOCJSON(dec, lim, &t); err != nil {
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

// decodeTOCJSON decodes the TOC object key by key and its arrays element
// by element, so that counts are checked while decoding: a few bytes of
// JSON ("{},") can stand for hundreds of bytes of Entry, and a limit on
// JSON bytes alone would not bound memory.
func decodeTOCJSON(dec *json.Decoder, lim Limits, t *TOC) error {
	if err := expectDelim(dec, '{'); err != nil {
		return err
	}
	seen := make(map[string]bool)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, ok := tok.(string)
		if !ok {
			return fmt.Errorf("object key is %T", tok)
		}
		if seen[key] {
			return fmt.Errorf("field %q repeated", key)
		}
		seen[key] = true
		switch key {
		case "version":
			err = dec.Decode(&t.Version)
		case "layer":
			err = dec.Decode(&t.Layer)
		case "diffID":
			err = dec.Decode(&t.DiffID)
		case "tarSize":
			err = dec.Decode(&t.TarSize)
		case "blobSize":
			err = dec.Decode(&t.BlobSize)
		case "chunkSize":
			err = dec.Decode(&t.ChunkSize)
		case "entries":
			err = decodeArray(dec, key, lim.MaxEntries, &t.Entries)
		case "chunks":
			err = decodeArray(dec, key, lim.MaxChunks, &t.Chunks)
		case "prefetch":
			err = decodeArray(dec, key, lim.MaxEntries, &t.Prefetch)
		case "prefetchRanges":
			err = decodeArray(dec, key, lim.MaxEntries, &t.PrefetchRanges)
		default:
			return fmt.Errorf("unknown field %q", short(key))
		}
		if err != nil {
			return fmt.Errorf("field %q: %w", key, err)
		}
	}
	if err := expectDelim(dec, '}'); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("data after the TOC object")
	}
	return nil
}

func expectDelim(dec *json.Decoder, want json.Delim) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != want {
		return fmt.Errorf("got %v, want %q", tok, string(want))
	}
	return nil
}

// decodeArray decodes a JSON array (or null) element by element onto
// *dst, failing as soon as it holds more than max elements.
func decodeArray[T any](dec *json.Decoder, what string, max int, dst *[]T) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if tok == nil {
		return nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return fmt.Errorf("got %v, want an array", tok)
	}
	for n := 0; dec.More(); n++ {
		if n >= max {
			return fmt.Errorf("more than %d %s", max, what)
		}
		var v T
		if err := dec.Decode(&v); err != nil {
			return fmt.Errorf("element %d: %w", n, err)
		}
		*dst = append(*dst, v)
	}
	return expectDelim(dec, ']')
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
	return DecodeChunkTo(c, frame, make([]byte, 0, c.Size))
}

// DecodeChunkTo is DecodeChunk decompressing into dst[:0] (grown when its
// capacity is short of c.Size): a caller that recycles buffers passes one.
func DecodeChunkTo(c Chunk, frame, dst []byte) ([]byte, error) {
	if int64(len(frame)) != c.CompressedSize {
		return nil, fmt.Errorf("chunk at %d: got %d compressed bytes, want %d", c.Offset, len(frame), c.CompressedSize)
	}
	out, err := chunkDecoder.DecodeAll(frame, dst[:0])
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

// chunkDecoder is shared: DecodeAll is safe for concurrent use. It skips
// the frames' own checksums (xxhash, a few percent of decoding): every
// chunk is checked against its sha256 digest, which a checksum could only
// repeat.
var chunkDecoder, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxChunkSize+1), zstd.IgnoreChecksum(true))

// Marshal encodes t and returns the bytes with their digest.
func (t *TOC) Marshal() ([]byte, digest.Digest, error) {
	var buf bytes.Buffer
	if err := EncodeTOC(&buf, t); err != nil {
		return nil, "", err
	}
	return buf.Bytes(), digest.FromBytes(buf.Bytes()), nil
}
