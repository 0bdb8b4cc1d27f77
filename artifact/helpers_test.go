package artifact

import (
	"bytes"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// sample is a small but complete layer: its uncompressed tar bytes (not a
// real tar; only offsets matter here), its streaming blob and its TOC.
type sample struct {
	tar  []byte
	blob []byte
	toc  *TOC
}

// newSample builds a valid TOC with real zstd frames covering every entry
// type, a file spanning two chunks, a hardlink, xattrs and a prefetch list.
func newSample(tb testing.TB) *sample {
	tb.Helper()
	const cs = MinChunkSize
	tarBytes := make([]byte, 3*cs+100)
	for i := range tarBytes {
		tarBytes[i] = byte(i*7 + i/cs)
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		tb.Fatalf("zstd writer: %v", err)
	}
	tb.Cleanup(func() { enc.Close() })
	var blob bytes.Buffer
	var chunks []Chunk
	for off := int64(0); off < int64(len(tarBytes)); off += cs {
		end := min(off+cs, int64(len(tarBytes)))
		frame := enc.EncodeAll(tarBytes[off:end], nil)
		chunks = append(chunks, Chunk{
			Offset: off, Size: end - off,
			CompressedOffset: int64(blob.Len()), CompressedSize: int64(len(frame)),
			Digest: digest.FromBytes(tarBytes[off:end]),
		})
		blob.Write(frame)
	}
	mtime := time.Unix(1700000000, 0).UTC()
	toc := &TOC{
		Version:   TOCVersion,
		Layer:     digest.FromString("layer"),
		DiffID:    digest.FromBytes(tarBytes),
		TarSize:   int64(len(tarBytes)),
		BlobSize:  int64(blob.Len()),
		ChunkSize: cs,
		Entries: []Entry{
			{Name: "etc", Type: TypeDir, Mode: 0o755, ModTime: mtime},
			{Name: "etc/passwd", Type: TypeReg, Mode: 0o644, ModTime: mtime, Size: 1000, Offset: cs},
			{Name: "etc/.wh..wh..opq", Type: TypeReg, Mode: 0o644, ModTime: mtime},
			{Name: "bin", Type: TypeDir, Mode: 0o755, ModTime: mtime},
			{Name: "bin/sh", Type: TypeReg, Mode: 0o4755, UID: 0, GID: 0, Uname: "root", Gname: "root", ModTime: mtime,
				Size: cs + 50, Offset: 2 * cs, Xattrs: map[string][]byte{"security.capability": {1, 2, 3}}},
			{Name: "bin/busybox", Type: TypeHardlink, Mode: 0o4755, ModTime: mtime, Linkname: "bin/sh"},
			{Name: "usr/bin/env", Type: TypeSymlink, Mode: 0o777, ModTime: mtime, Linkname: "/bin/sh"},
			{Name: "dev/null", Type: TypeChar, Mode: 0o666, ModTime: mtime, Devmajor: 1, Devminor: 3},
			{Name: "dev/sda", Type: TypeBlock, Mode: 0o660, ModTime: mtime, Devmajor: 8, Devminor: 0},
			{Name: "run/fifo", Type: TypeFifo, Mode: 0o600, ModTime: mtime},
			{Name: ".wh.old", Type: TypeReg, Mode: 0, ModTime: mtime},
			{Name: "a-b", Type: TypeReg, Mode: 0o644, ModTime: mtime},
			{Name: "a", Type: TypeDir, Mode: 0o755, ModTime: mtime},
			{Name: "a/b", Type: TypeReg, Mode: 0o644, ModTime: mtime},
		},
		Chunks:         chunks,
		Prefetch:       []string{"bin/sh", "etc/passwd", "bin/busybox"},
		PrefetchRanges: []FileRanges{{Name: "bin/sh", Ranges: []Range{{Offset: 0, Size: 100}, {Offset: cs, Size: 50}}}},
	}
	if err := toc.Validate(Limits{}); err != nil {
		tb.Fatalf("sample TOC is invalid: %v", err)
	}
	return &sample{tar: tarBytes, blob: blob.Bytes(), toc: toc}
}

// frame returns chunk i's compressed frame from the sample blob.
func (s *sample) frame(i int) []byte {
	c := s.toc.Chunks[i]
	return s.blob[c.CompressedOffset : c.CompressedOffset+c.CompressedSize]
}

// cloneTOC deep-copies the slices a test mutates.
func cloneTOC(t *TOC) *TOC {
	c := *t
	c.Entries = append([]Entry(nil), t.Entries...)
	c.Chunks = append([]Chunk(nil), t.Chunks...)
	c.Prefetch = append([]string(nil), t.Prefetch...)
	c.PrefetchRanges = nil
	for _, fr := range t.PrefetchRanges {
		c.PrefetchRanges = append(c.PrefetchRanges, FileRanges{Name: fr.Name, Ranges: append([]Range(nil), fr.Ranges...)})
	}
	for i := range c.Entries {
		if x := c.Entries[i].Xattrs; x != nil {
			c.Entries[i].Xattrs = make(map[string][]byte, len(x))
			for k, v := range x {
				c.Entries[i].Xattrs[k] = v
			}
		}
	}
	return &c
}

// entry returns a pointer to the sample entry named name.
func entry(tb testing.TB, t *TOC, name string) *Entry {
	tb.Helper()
	for i := range t.Entries {
		if t.Entries[i].Name == name {
			return &t.Entries[i]
		}
	}
	tb.Fatalf("no entry %q", name)
	return nil
}
