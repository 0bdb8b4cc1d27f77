package fs

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/artifact"
)

// synthReader serves chunk bytes computed from tar offsets, and records
// which chunks were asked for, one by one or in runs.
type synthReader struct {
	mu     sync.Mutex
	single []int64
	runs   [][]int64
}

func synthByte(off int64) byte { return byte(off*7 + off/251) }

func synthChunk(c artifact.Chunk) []byte {
	b := make([]byte, c.Size)
	for i := range b {
		b[i] = synthByte(c.Offset + int64(i))
	}
	return b
}

func (r *synthReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	r.mu.Lock()
	r.single = append(r.single, c.Offset)
	r.mu.Unlock()
	return synthChunk(c), nil
}

type synthRunReader struct{ synthReader }

func (r *synthRunReader) ReadChunks(ctx context.Context, cs []artifact.Chunk) ([][]byte, error) {
	var offs []int64
	out := make([][]byte, len(cs))
	for i, c := range cs {
		offs = append(offs, c.Offset)
		out[i] = synthChunk(c)
	}
	r.mu.Lock()
	r.runs = append(r.runs, offs)
	r.mu.Unlock()
	return out, nil
}

// synthTOC has chunks of 300 bytes over 3000 tar bytes, and a file whose
// data [100, 1100) does not start on a chunk boundary.
func synthTOC() *artifact.TOC {
	toc := &artifact.TOC{Version: artifact.TOCVersion, TarSize: 3000, Layer: "sha256:test"}
	for off := int64(0); off < 3000; off += 300 {
		toc.Chunks = append(toc.Chunks, artifact.Chunk{Offset: off, Size: 300})
	}
	toc.Entries = []artifact.Entry{
		{Name: ".", Type: artifact.TypeDir, Mode: 0o700, UID: 5, GID: 6, ModTime: time.Unix(1700000000, 5)},
		{Name: "f", Type: artifact.TypeReg, Mode: 0o644, Offset: 100, Size: 1000},
	}
	return toc
}

func TestReadMapsToChunks(t *testing.T) {
	tests := []struct {
		name      string
		off       int64
		n         int
		wantN     int64
		wantChunk []int64 // tar offsets of the chunks fetched
	}{
		{"inside the first chunk", 0, 50, 50, []int64{0}},
		{"to the end of a chunk", 0, 200, 200, []int64{0}},
		{"across one boundary", 150, 100, 100, []int64{0, 300}},
		{"across three chunks", 150, 500, 500, []int64{0, 300, 600}},
		{"clamped at the end of the file", 900, 4096, 100, []int64{900}},
		{"past the end", 1000, 10, 0, nil},
		{"whole file", 0, 1000, 1000, []int64{0, 300, 600, 900}},
	}
	for _, runs := range []bool{false, true} {
		for _, tt := range tests {
			t.Run(fmt.Sprintf("runs=%v/%s", runs, tt.name), func(t *testing.T) {
				var r ChunkReader = &synthReader{}
				if runs {
					r = &synthRunReader{}
				}
				root, err := newRoot(synthTOC(), r, Options{})
				if err != nil {
					t.Fatal(err)
				}
				f := &fileNode{offset: 100, size: 1000, name: "f"}
				f.layer = root.layer
				dest := make([]byte, tt.n)
				res, errno := root.layer.read(context.Background(), f, dest, tt.off)
				if errno != 0 {
					t.Fatalf("read: %v", errno)
				}
				got, _ := res.Bytes(nil)
				want := make([]byte, tt.wantN)
				for i := range want {
					want[i] = synthByte(100 + tt.off + int64(i))
				}
				if !bytes.Equal(got, want) {
					t.Errorf("read %d bytes, want %d (or content differs)", len(got), len(want))
				}
				var fetched []int64
				switch r := r.(type) {
				case *synthReader:
					fetched = r.single
				case *synthRunReader:
					for _, run := range r.runs {
						fetched = append(fetched, run...)
					}
					fetched = append(fetched, r.single...)
					if len(tt.wantChunk) > 1 && (len(r.runs) != 1 || len(r.single) != 0) {
						t.Errorf("runs %v, singles %v: want one run", r.runs, r.single)
					}
				}
				if fmt.Sprint(sortedInts(fetched)) != fmt.Sprint(tt.wantChunk) && !(len(fetched) == 0 && tt.wantChunk == nil) {
					t.Errorf("fetched %v, want %v", fetched, tt.wantChunk)
				}
			})
		}
	}
}

func sortedInts(s []int64) []int64 {
	out := append([]int64(nil), s...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

func TestReadRejectsBadTOC(t *testing.T) {
	toc := synthTOC()
	toc.Chunks = toc.Chunks[:2] // the file's data runs past the last chunk
	quiet := logrus.New()
	quiet.SetOutput(io.Discard)
	root, err := newRoot(toc, &synthReader{}, Options{Logger: logrus.NewEntry(quiet)})
	if err != nil {
		t.Fatal(err)
	}
	f := &fileNode{offset: 100, size: 1000, name: "f"}
	f.layer = root.layer
	if _, errno := root.layer.read(context.Background(), f, make([]byte, 1000), 0); errno != syscall.EIO {
		t.Errorf("read beyond the chunks: errno %v, want EIO", errno)
	}
}

func TestRootEntry(t *testing.T) {
	root, err := newRoot(synthTOC(), &synthReader{}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var out fuse.AttrOut
	root.Getattr(context.Background(), nil, &out)
	a := out.Attr
	if a.Mode != syscall.S_IFDIR|0o700 || a.Uid != 5 || a.Gid != 6 || a.Mtime != 1700000000 || a.Mtimensec != 5 || a.Ino != 1 || a.Nlink != 2 {
		t.Errorf("root attr %+v: want dir 0700 5:6 mtime 1700000000.5 ino 1 nlink 2", a)
	}
}
