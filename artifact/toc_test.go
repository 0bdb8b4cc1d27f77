package artifact

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

func TestTOCRoundTrip(t *testing.T) {
	s := newSample(t)
	b, d, err := s.toc.Marshal()
	if err != nil {
		t.Fatalf("Marshal: %v", err)
	}
	if d.Validate() != nil || d.Algorithm() != "sha256" {
		t.Fatalf("Marshal digest %q is not a sha256 digest", d)
	}
	got, err := DecodeTOC(bytes.NewReader(b), Limits{})
	if err != nil {
		t.Fatalf("DecodeTOC: %v", err)
	}
	if !reflect.DeepEqual(got, s.toc) {
		t.Errorf("round trip changed the TOC:\ngot  %+v\nwant %+v", got, s.toc)
	}
}

// testEncoder is shared: EncodeAll is safe for concurrent use, and creating
// an encoder per call would dominate fuzzing time.
var testEncoder, _ = zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))

// zstdJSON compresses a JSON document the way EncodeTOC does.
func zstdJSON(tb testing.TB, doc string) []byte {
	tb.Helper()
	return testEncoder.EncodeAll([]byte(doc), nil)
}

// zstdStream compresses doc as a stream, without the content size in the
// frame header, so only the decoder's byte limit can stop it.
func zstdStream(tb testing.TB, doc string) []byte {
	tb.Helper()
	var buf bytes.Buffer
	enc, err := zstd.NewWriter(&buf, zstd.WithWindowSize(1<<17))
	if err != nil {
		tb.Fatalf("zstd writer: %v", err)
	}
	for i := 0; i < len(doc); i += 1 << 16 {
		if _, err := enc.Write([]byte(doc[i:min(i+1<<16, len(doc))])); err != nil {
			tb.Fatalf("zstd write: %v", err)
		}
	}
	if err := enc.Close(); err != nil {
		tb.Fatalf("zstd close: %v", err)
	}
	return buf.Bytes()
}

func TestDecodeTOCRejects(t *testing.T) {
	s := newSample(t)
	valid, _, err := s.toc.Marshal()
	if err != nil {
		t.Fatalf("Marshal: %v", err)
	}
	tests := []struct {
		name  string
		input []byte
		lim   Limits
		want  string
	}{
		{"not zstd", []byte(`{"version":1}`), Limits{}, ""},
		{"empty", nil, Limits{}, ""},
		{"truncated", valid[:len(valid)/2], Limits{}, ""},
		{"not an object", zstdJSON(t, `[1,2]`), Limits{}, `want "{"`},
		{"unknown field", zstdJSON(t, `{"version":1,"evil":true}`), Limits{}, "unknown field"},
		{"unknown entry field", zstdJSON(t, `{"entries":[{"name":"a","evil":1}]}`), Limits{}, "unknown field"},
		{"repeated field", zstdJSON(t, `{"version":1,"version":1}`), Limits{}, "repeated"},
		{"trailing data", zstdJSON(t, `{"version":1} {}`), Limits{}, "after the TOC"},
		{"entries not array", zstdJSON(t, `{"entries":{}}`), Limits{}, "want an array"},
		{"entry count while decoding", zstdJSON(t, `{"entries":[{},{},{},{}]}`), Limits{MaxEntries: 3}, "more than 3 entries"},
		{"chunk count while decoding", zstdJSON(t, `{"chunks":[{},{},{}]}`), Limits{MaxChunks: 2}, "more than 2 chunks"},
		{"bomb", zstdJSON(t, strings.Repeat(" ", 4<<20)+`{}`), Limits{MaxTOCBytes: 1 << 20}, "larger than|exceeds"},
		{"streamed bomb", zstdStream(t, strings.Repeat(" ", 4<<20)+`{}`), Limits{MaxTOCBytes: 1 << 20}, "larger than"},
		{"range of three numbers", zstdJSON(t, `{"prefetchRanges":[{"name":"a","ranges":[[1,2,3]]}]}`), Limits{}, "3 numbers"},
		{"range as an object", zstdJSON(t, `{"prefetchRanges":[{"name":"a","ranges":[{"offset":1}]}]}`), Limits{}, "range:"},
		{"unknown prefetch ranges field", zstdJSON(t, `{"prefetchRanges":[{"name":"a","evil":1}]}`), Limits{}, "unknown field"},
		{"prefetch ranges count while decoding", zstdJSON(t, `{"prefetchRanges":[{},{},{},{}]}`), Limits{MaxEntries: 3}, "more than 3 prefetchRanges"},
		{"valid JSON, invalid TOC", zstdJSON(t, `{"version":1}`), Limits{}, "layer:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			toc, err := DecodeTOC(bytes.NewReader(tt.input), tt.lim)
			if err == nil {
				t.Fatalf("DecodeTOC accepted %d bytes: %+v", len(tt.input), toc)
			}
			if !errors.Is(err, ErrInvalidTOC) {
				t.Errorf("error %v does not wrap ErrInvalidTOC", err)
			}
			if !containsAny(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

// containsAny reports whether s contains one of the |-separated substrings.
func containsAny(s, alts string) bool {
	for _, a := range strings.Split(alts, "|") {
		if strings.Contains(s, a) {
			return true
		}
	}
	return false
}

func TestChunkRange(t *testing.T) {
	s := newSample(t)
	const cs = MinChunkSize
	tests := []struct {
		name        string
		off, n      int64
		first, last int
	}{
		{"empty read", 10, 0, 0, 0},
		{"negative length", 10, -1, 0, 0},
		{"first byte", 0, 1, 0, 1},
		{"whole first chunk", 0, cs, 0, 1},
		{"crosses a boundary", cs - 1, 2, 0, 2},
		{"starts on a boundary", cs, 10, 1, 2},
		{"last byte", 3*cs + 99, 1, 3, 4},
		{"everything", 0, 3*cs + 100, 0, 4},
		{"past the end", 3*cs + 100, 10, 4, 4},
		{"beyond the end", 0, 1 << 40, 0, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			first, last := s.toc.ChunkRange(tt.off, tt.n)
			if first != tt.first || last != tt.last {
				t.Errorf("ChunkRange(%d, %d) = [%d, %d), want [%d, %d)", tt.off, tt.n, first, last, tt.first, tt.last)
			}
		})
	}
}

func TestDecodeChunk(t *testing.T) {
	s := newSample(t)
	for i, c := range s.toc.Chunks {
		got, err := DecodeChunk(c, s.frame(i))
		if err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		if !bytes.Equal(got, s.tar[c.Offset:c.Offset+c.Size]) {
			t.Fatalf("chunk %d: decoded bytes differ from the tar", i)
		}
	}

	c := s.toc.Chunks[1]
	// Other bytes of the same length, properly compressed: only the digest
	// can tell.
	other := bytes.Clone(s.tar[c.Offset : c.Offset+c.Size])
	other[100] ^= 0xff
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatalf("zstd writer: %v", err)
	}
	t.Cleanup(func() { enc.Close() })
	otherFrame := enc.EncodeAll(other, nil)
	altered := bytes.Clone(s.frame(1))
	altered[len(altered)/2] ^= 0x01

	tests := []struct {
		name     string
		chunk    Chunk
		frame    []byte
		mismatch bool // want ErrDigestMismatch
	}{
		{"other content", Chunk{Offset: c.Offset, Size: c.Size, CompressedSize: int64(len(otherFrame)), Digest: c.Digest}, otherFrame, true},
		{"wrong size", Chunk{Offset: c.Offset, Size: c.Size - 1, CompressedSize: c.CompressedSize, Digest: c.Digest}, s.frame(1), true},
		{"altered frame", c, altered, false},
		{"short frame", c, s.frame(1)[:c.CompressedSize-1], false},
		{"garbage", Chunk{Size: 10, CompressedSize: 4, Digest: c.Digest}, []byte("junk"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := DecodeChunk(tt.chunk, tt.frame)
			if err == nil {
				t.Fatalf("DecodeChunk returned %d unverified bytes", len(out))
			}
			if out != nil {
				t.Errorf("DecodeChunk returned bytes with error %v", err)
			}
			if tt.mismatch && !errors.Is(err, ErrDigestMismatch) {
				t.Errorf("error %v does not wrap ErrDigestMismatch", err)
			}
		})
	}
}

// TestMergeRanges: ranges added one at a time, in any order (a profile's
// chunks as they are read), stay sorted, disjoint and merged.
func TestMergeRanges(t *testing.T) {
	r := func(off, n int64) Range { return Range{Offset: off, Size: n} }
	var rs []Range
	for _, add := range []Range{r(50, 10), r(10, 10), r(30, 5), r(20, 10), r(70, 5), r(0, 5), r(34, 20)} {
		rs = MergeRanges(append(rs, add))
	}
	want := []Range{r(0, 5), r(10, 50), r(70, 5)}
	if !reflect.DeepEqual(rs, want) {
		t.Fatalf("ranges %v, want %v", rs, want)
	}
	if rs = MergeRanges(append(rs, r(0, 100))); !reflect.DeepEqual(rs, []Range{r(0, 100)}) {
		t.Fatalf("ranges %v after one covering all, want [0, 100)", rs)
	}
}

// BenchmarkDecodeChunk decodes and verifies a 1 MiB chunk (half text,
// half random) as the snapshotter does, and with the decoder checking the
// frames' xxhash checksums as well, which DecodeChunkTo skips: the sha256
// digest covers the same bytes.
func BenchmarkDecodeChunk(b *testing.B) {
	const size = 1 << 20
	data := make([]byte, 0, size)
	for len(data) < size/2 {
		data = fmt.Appendf(data, "line %d of a file that compresses well, as source and text do\n", len(data))
	}
	noise := make([]byte, size-len(data))
	rand.NewChaCha8([32]byte{1}).Read(noise)
	data = append(data, noise...)
	frame := testEncoder.EncodeAll(data, nil)
	c := Chunk{Size: size, CompressedSize: int64(len(frame)), Digest: digest.FromBytes(data)}
	checked, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxChunkSize+1))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(checked.Close)
	dst := make([]byte, 0, size)
	b.Run("digest", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			if _, err := DecodeChunkTo(c, frame, dst); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("digest and checksum", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			out, err := checked.DecodeAll(frame, dst[:0])
			if err != nil || digest.FromBytes(out) != c.Digest {
				b.Fatal("decode", err)
			}
		}
	})
}
