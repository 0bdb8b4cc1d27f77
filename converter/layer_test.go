package converter

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"path"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/artifact"
)

const testChunk = artifact.MinChunkSize

func testContext(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// convert runs ConvertLayer on input and checks every property a streaming
// layer must have; it returns the result and the blob.
func convert(t *testing.T, input []byte, opts LayerOptions) (*LayerResult, []byte) {
	t.Helper()
	var blob bytes.Buffer
	res, err := ConvertLayer(testContext(t), bytes.NewReader(input), &blob, opts)
	if err != nil {
		t.Fatalf("ConvertLayer: %v", err)
	}
	checkLayer(t, input, res, blob.Bytes())
	return res, blob.Bytes()
}

func checkLayer(t *testing.T, input []byte, res *LayerResult, blob []byte) {
	t.Helper()
	toc := res.TOC
	chunkSize := toc.ChunkSize

	// The blob is a plain tar+zstd stream of exactly the input.
	zr, err := zstd.NewReader(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	got, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("decompress blob: %v", err)
	}
	if !bytes.Equal(got, input) {
		t.Fatalf("decompressed blob differs from input: %d bytes, want %d", len(got), len(input))
	}

	want := digest.FromBytes(input)
	if res.DiffID != want || toc.DiffID != want {
		t.Errorf("DiffID = %s / TOC %s, want %s", res.DiffID, toc.DiffID, want)
	}
	if toc.TarSize != int64(len(input)) || toc.BlobSize != int64(len(blob)) {
		t.Errorf("TOC sizes tar %d blob %d, want %d %d", toc.TarSize, toc.BlobSize, len(input), len(blob))
	}
	if res.Blob.Digest != digest.FromBytes(blob) || res.Blob.Size != int64(len(blob)) || res.Blob.MediaType != artifact.MediaTypeStreamingLayer {
		t.Errorf("blob descriptor %+v does not describe the blob (%d bytes)", res.Blob, len(blob))
	}
	if toc.Version != artifact.TOCVersion {
		t.Errorf("TOC version %d", toc.Version)
	}

	// Chunks tile the tar and the blob, each one frame of verified bytes.
	starts := map[int64]bool{}
	var off, coff int64
	for i, c := range toc.Chunks {
		if c.Offset != off || c.CompressedOffset != coff || c.Size <= 0 || c.Size > chunkSize {
			t.Fatalf("chunk %d = %+v, want offset %d coffset %d size in (0,%d]", i, c, off, coff, chunkSize)
		}
		b, err := artifact.DecodeChunk(c, blob[c.CompressedOffset:c.CompressedOffset+c.CompressedSize])
		if err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		if !bytes.Equal(b, input[c.Offset:c.Offset+c.Size]) {
			t.Fatalf("chunk %d holds other bytes than the tar", i)
		}
		starts[c.Offset] = true
		off += c.Size
		coff += c.CompressedSize
	}
	starts[off] = true
	if off != int64(len(input)) || coff != int64(len(blob)) {
		t.Fatalf("chunks cover %d/%d bytes, want %d/%d", off, coff, len(input), len(blob))
	}

	// Entries match an independent reading of the tar.
	wantEntries := referenceEntries(t, input)
	if len(toc.Entries) != len(wantEntries) {
		t.Fatalf("%d entries, want %d", len(toc.Entries), len(wantEntries))
	}
	for i, e := range toc.Entries {
		w := wantEntries[i]
		if e.Name != w.Name || e.Type != w.Type || e.Mode != w.Mode || e.UID != w.UID || e.GID != w.GID ||
			e.Uname != w.Uname || e.Gname != w.Gname || !e.ModTime.Equal(w.ModTime) || e.Size != w.Size ||
			e.Linkname != w.Linkname || e.Devmajor != w.Devmajor || e.Devminor != w.Devminor ||
			!reflect.DeepEqual(e.Xattrs, w.Xattrs) {
			t.Errorf("entry %d:\n got %s\nwant %s", i, jsonOf(e), jsonOf(w))
		}
		if e.Type == artifact.TypeReg && e.Size > 0 {
			if !bytes.Equal(input[e.Offset:e.Offset+e.Size], w.data) {
				t.Errorf("entry %q: data at offset %d is not the file's", e.Name, e.Offset)
			}
			if !starts[e.Offset] || !starts[e.Offset+e.Size] {
				t.Errorf("entry %q: data [%d,%d) does not lie on chunk boundaries", e.Name, e.Offset, e.Offset+e.Size)
			}
		}
	}

	// The TOC survives encoding and validation unchanged.
	toc.Layer = digest.FromString("original layer")
	var enc bytes.Buffer
	if err := artifact.EncodeTOC(&enc, toc); err != nil {
		t.Fatal(err)
	}
	dec, err := artifact.DecodeTOC(&enc, artifact.Limits{})
	if err != nil {
		t.Fatalf("DecodeTOC: %v", err)
	}
	if len(dec.Entries) == 0 && len(toc.Entries) == 0 {
		dec.Entries = toc.Entries // an empty list may decode as nil
	}
	if !reflect.DeepEqual(dec, toc) {
		t.Fatalf("TOC round trip differs:\n got %s\nwant %s", jsonOf(dec), jsonOf(toc))
	}
}

type refEntry struct {
	artifact.Entry
	data []byte
}

// referenceEntries reads input with archive/tar and states what the TOC
// entries must be.
func referenceEntries(t *testing.T, input []byte) []refEntry {
	t.Helper()
	types := map[byte]artifact.EntryType{
		tar.TypeReg: artifact.TypeReg, tar.TypeDir: artifact.TypeDir, tar.TypeSymlink: artifact.TypeSymlink,
		tar.TypeLink: artifact.TypeHardlink, tar.TypeChar: artifact.TypeChar, tar.TypeBlock: artifact.TypeBlock,
		tar.TypeFifo: artifact.TypeFifo,
	}
	clean := func(n string) string {
		c := strings.TrimPrefix(path.Clean("/"+n), "/")
		if c == "" {
			return "."
		}
		return c
	}
	var out []refEntry
	tr := tar.NewReader(bytes.NewReader(input))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("reference read: %v", err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatalf("reference read: %v", err)
		}
		e := refEntry{Entry: artifact.Entry{
			Name: clean(h.Name), Type: types[h.Typeflag], Mode: h.Mode & 0o7777, UID: h.Uid, GID: h.Gid,
			Uname: h.Uname, Gname: h.Gname, ModTime: h.ModTime, Linkname: h.Linkname,
			Devmajor: h.Devmajor, Devminor: h.Devminor,
		}, data: data}
		if e.Name == "." {
			continue // the root is the mount point, not an entry
		}
		switch h.Typeflag {
		case tar.TypeReg:
			e.Size = h.Size
		case tar.TypeLink:
			e.Linkname = clean(h.Linkname)
		}
		for k, v := range h.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if e.Xattrs == nil {
					e.Xattrs = map[string][]byte{}
				}
				e.Xattrs[x] = []byte(v)
			}
		}
		out = append(out, e)
	}
}

func jsonOf(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestConvertLayer(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	cases := []struct {
		name    string
		format  tar.Format
		entries []tarEntry
		pad     int
		opts    LayerOptions
	}{
		{name: "empty archive", format: tar.FormatPAX},
		{name: "every type PAX", format: tar.FormatPAX, entries: everyTypeEntries(rng, testChunk)},
		{name: "every type GNU", format: tar.FormatGNU, entries: everyTypeEntries(rng, testChunk)},
		{name: "record padding kept", format: tar.FormatPAX, entries: everyTypeEntries(rng, testChunk), pad: 10240},
		{name: "one worker level 19", format: tar.FormatPAX, entries: everyTypeEntries(rng, testChunk), opts: LayerOptions{Concurrency: 1, Level: 19}},
		{name: "default chunk size", format: tar.FormatPAX, entries: everyTypeEntries(rng, artifact.DefaultChunkSize), opts: LayerOptions{ChunkSize: 0}},
		{name: "many workers", format: tar.FormatPAX, entries: randomEntries(rng, "", 300, 3*testChunk), opts: LayerOptions{Concurrency: 8}},
	}
	for seed := range uint64(8) {
		r := rand.New(rand.NewPCG(seed, 99))
		f := tar.FormatPAX
		if seed%2 == 1 {
			f = tar.FormatGNU
		}
		cases = append(cases, struct {
			name    string
			format  tar.Format
			entries []tarEntry
			pad     int
			opts    LayerOptions
		}{name: "random seed " + string(rune('0'+seed)), format: f, entries: randomEntries(r, "", 40+r.IntN(60), 3*testChunk), pad: r.IntN(3) * 512})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.opts.ChunkSize == 0 && tc.name != "default chunk size" {
				tc.opts.ChunkSize = testChunk
			}
			input := buildTar(t, tc.format, tc.entries, tc.pad)
			res, blob := convert(t, input, tc.opts)
			checkRandomAccess(t, rand.New(rand.NewPCG(7, uint64(len(input)))), input, res.TOC, blob)
		})
	}
}

// checkRandomAccess reads random ranges of every file through the chunk
// table, as the FUSE layer does, and compares them with the tar.
func checkRandomAccess(t *testing.T, rng *rand.Rand, input []byte, toc *artifact.TOC, blob []byte) {
	t.Helper()
	for _, e := range toc.Entries {
		if e.Type != artifact.TypeReg || e.Size == 0 {
			continue
		}
		for range 5 {
			off := rng.Int64N(e.Size)
			n := 1 + rng.Int64N(e.Size-off)
			first, last := toc.ChunkRange(e.Offset+off, n)
			var b []byte
			for _, c := range toc.Chunks[first:last] {
				d, err := artifact.DecodeChunk(c, blob[c.CompressedOffset:c.CompressedOffset+c.CompressedSize])
				if err != nil {
					t.Fatalf("%s: chunk at %d: %v", e.Name, c.Offset, err)
				}
				b = append(b, d...)
			}
			if first >= last {
				t.Fatalf("%s [%d,+%d): no chunks", e.Name, off, n)
			}
			start := e.Offset + off - toc.Chunks[first].Offset
			if int64(len(b)) < start+n || !bytes.Equal(b[start:start+n], input[e.Offset+off:e.Offset+off+n]) {
				t.Fatalf("%s [%d,+%d): bytes through the chunk table differ from the tar", e.Name, off, n)
			}
		}
	}
}

func TestConvertLayerSharesChunksOfIdenticalFiles(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	shared := []tarEntry{
		{hdr: tar.Header{Name: "usr/lib/libbig.so", Typeflag: tar.TypeReg, Mode: 0o755, ModTime: baseTime}, data: fileData(rng, 2*testChunk+1234, false)},
		{hdr: tar.Header{Name: "etc/small.conf", Typeflag: tar.TypeReg, Mode: 0o644, ModTime: baseTime}, data: fileData(rng, 1000, true)},
	}
	layerA := buildTar(t, tar.FormatPAX, append(randomEntries(rng, "a/", 7, testChunk), shared...), 0)
	// Layer B: other files before and after, other names and metadata.
	b := randomEntries(rng, "b/", 13, testChunk)
	b = append(b, tarEntry{hdr: tar.Header{Name: "opt/copy.so", Typeflag: tar.TypeReg, Mode: 0o700, Uid: 5, ModTime: baseTime.Add(time.Hour)}, data: shared[0].data})
	b = append(b, randomEntries(rng, "c/", 3, testChunk)...)
	b = append(b, tarEntry{hdr: tar.Header{Name: "x/y/small.conf", Typeflag: tar.TypeReg, Mode: 0o600, ModTime: baseTime}, data: shared[1].data})
	b = append(b, randomEntries(rng, "d/", 3, testChunk)...)
	layerB := buildTar(t, tar.FormatGNU, b, 0)

	resA, _ := convert(t, layerA, LayerOptions{ChunkSize: testChunk})
	resB, _ := convert(t, layerB, LayerOptions{ChunkSize: testChunk})
	fileChunks := func(toc *artifact.TOC, name string) []digest.Digest {
		t.Helper()
		for _, e := range toc.Entries {
			if e.Name == name {
				first, last := toc.ChunkRange(e.Offset, e.Size)
				var ds []digest.Digest
				for _, c := range toc.Chunks[first:last] {
					ds = append(ds, c.Digest)
				}
				return ds
			}
		}
		t.Fatalf("no entry %q", name)
		return nil
	}
	for _, pair := range [][2]string{{"usr/lib/libbig.so", "opt/copy.so"}, {"etc/small.conf", "x/y/small.conf"}} {
		a, b := fileChunks(resA.TOC, pair[0]), fileChunks(resB.TOC, pair[1])
		if len(a) == 0 || !reflect.DeepEqual(a, b) {
			t.Errorf("%s and %s: chunk digests differ:\n%v\n%v", pair[0], pair[1], a, b)
		}
	}
}

func TestConvertLayerRejects(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	good := buildTar(t, tar.FormatPAX, everyTypeEntries(rng, testChunk), 0)
	corrupt := bytes.Clone(good)
	corrupt[148] ^= 0x11 // first header's checksum
	hdr := func(h tar.Header) []byte {
		h.ModTime = baseTime
		return buildTar(t, tar.FormatPAX, []tarEntry{{hdr: h}}, 0)
	}
	cases := []struct {
		name  string
		input []byte
		want  string
	}{
		{"bad checksum", corrupt, "read header"},
		{"truncated data", good[:len(good)/2], "data of"},
		{"truncated header", good[:700], "read header"},
		{"dot-dot name", hdr(tar.Header{Name: "a/../../etc/passwd", Typeflag: tar.TypeReg}), `contains ".."`},
		{"dot-dot hardlink", hdr(tar.Header{Name: "a", Typeflag: tar.TypeLink, Linkname: "../x"}), "hardlink target"},
		{"unknown type", hdr(tar.Header{Name: "v", Typeflag: 'V'}), "unsupported entry type"},
		{"old GNU sparse", withTypeflag(t, buildTar(t, tar.FormatGNU, []tarEntry{{hdr: tar.Header{Name: "s", Typeflag: tar.TypeReg, ModTime: baseTime}}}, 0), tar.TypeGNUSparse), "sparse"},
		{"symlink without target", hdr(tar.Header{Name: "l", Typeflag: tar.TypeSymlink}), "without target"},
		{"garbage", bytes.Repeat([]byte("not a tar "), 100), "read header"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res, err := ConvertLayer(testContext(t), bytes.NewReader(tc.input), io.Discard, LayerOptions{ChunkSize: testChunk})
			if !errors.Is(err, ErrBadTar) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ConvertLayer = %v, %v; want ErrBadTar mentioning %q", res, err, tc.want)
			}
		})
	}
}

type failingWriter struct{ after int }

func (w *failingWriter) Write(b []byte) (int, error) {
	if w.after -= len(b); w.after < 0 {
		return 0, errors.New("disk full")
	}
	return len(b), nil
}

type failingReader struct{ r io.Reader }

func (f failingReader) Read(b []byte) (int, error) {
	n, err := f.r.Read(b)
	if err == io.EOF {
		return n, errors.New("connection reset")
	}
	return n, err
}

func TestConvertLayerFailures(t *testing.T) {
	rng := rand.New(rand.NewPCG(8, 9))
	input := buildTar(t, tar.FormatPAX, randomEntries(rng, "", 50, 3*testChunk), 0)
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	cases := []struct {
		name string
		ctx  context.Context
		r    io.Reader
		w    io.Writer
		opts LayerOptions
		want string
		bad  bool // ErrBadTar expected
	}{
		{name: "blob write fails", r: bytes.NewReader(input), w: &failingWriter{after: 10000}, want: "disk full"},
		{name: "source fails", r: failingReader{io.LimitReader(bytes.NewReader(input), int64(len(input)/2))}, w: io.Discard, want: "connection reset"},
		{name: "canceled", ctx: canceled, r: bytes.NewReader(input), w: io.Discard, want: "context canceled"},
		{name: "chunk size too small", r: bytes.NewReader(input), w: io.Discard, opts: LayerOptions{ChunkSize: 1000}, want: "chunk size"},
		{name: "level too high", r: bytes.NewReader(input), w: io.Discard, opts: LayerOptions{Level: 23}, want: "level"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := tc.ctx
			if ctx == nil {
				ctx = testContext(t)
			}
			if tc.opts.ChunkSize == 0 {
				tc.opts.ChunkSize = testChunk
			}
			_, err := ConvertLayer(ctx, tc.r, tc.w, tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) || errors.Is(err, ErrBadTar) {
				t.Fatalf("ConvertLayer error = %v, want one mentioning %q and not ErrBadTar", err, tc.want)
			}
		})
	}
}

// withTypeflag rewrites the first header's typeflag and fixes its checksum:
// archive/tar's writer refuses to write some types.
func withTypeflag(t *testing.T, b []byte, flag byte) []byte {
	t.Helper()
	b = bytes.Clone(b)
	b[156] = flag
	copy(b[148:156], "        ")
	sum := 0
	for _, c := range b[:512] {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	if _, err := tar.NewReader(bytes.NewReader(b)).Next(); err != nil {
		t.Fatalf("patched header does not parse: %v", err)
	}
	return b
}
