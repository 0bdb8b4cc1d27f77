package fs

import (
	"fmt"
	"reflect"
	"testing"

	"github.com/streamer-dev/streamer/artifact"
)

// layoutTOC builds a TOC of regular files laid out one after another, each
// in chunks of at most chunk bytes compressing to half their size, as the
// converter lays files out (data starts on a chunk boundary).
func layoutTOC(sizes map[string]int64, order []string, chunk int64) *artifact.TOC {
	toc := &artifact.TOC{}
	var off, coff int64
	for _, name := range order {
		size := sizes[name]
		off += 512 // the header, in a chunk of its own
		toc.Chunks = append(toc.Chunks, artifact.Chunk{Offset: off - 512, Size: 512, CompressedOffset: coff, CompressedSize: 100})
		coff += 100
		toc.Entries = append(toc.Entries, artifact.Entry{Name: name, Type: artifact.TypeReg, Size: size, Offset: off})
		for left := size; left > 0; left -= chunk {
			n := min(left, chunk)
			toc.Chunks = append(toc.Chunks, artifact.Chunk{Offset: off, Size: n, CompressedOffset: coff, CompressedSize: n / 2})
			off += n
			coff += n / 2
		}
	}
	return toc
}

// chunksOfFile is the chunk range [first, last) holding name's data.
func chunksOfFile(toc *artifact.TOC, name string) (int, int) {
	for _, e := range toc.Entries {
		if e.Name == name {
			return toc.ChunkRange(e.Offset, e.Size)
		}
	}
	panic("no entry " + name)
}

func TestPlanPrefetchMergesAcrossFilesInBlobOrder(t *testing.T) {
	const MiB = 1 << 20
	// a..h small files; big is 8 MiB (4 MiB compressed) never listed.
	order := []string{"a", "b", "c", "d", "big", "e", "f", "g"}
	sizes := map[string]int64{"big": 8 * MiB}
	for _, n := range order {
		if n != "big" {
			sizes[n] = 40 << 10
		}
	}
	toc := layoutTOC(sizes, order, 1*MiB)
	chunk := func(name string) (int, int) { return chunksOfFile(toc, name) }

	// Listed in access order g, c, a, f: a and c bridge b (a 20 KiB gap);
	// f and g are adjacent but the 4 MiB of big keep them apart from a..c.
	toc.Prefetch = []string{"g", "c", "a", "f", "missing"}
	got := planPrefetch(toc, 4*MiB, 1*MiB)
	aFirst, _ := chunk("a")
	_, cLast := chunk("c")
	fFirst, _ := chunk("f")
	_, gLast := chunk("g")
	want := []prefetchRun{
		{first: fFirst, last: gLast, rank: 0}, // serves g, listed first
		{first: aFirst, last: cLast, rank: 1}, // serves c (1) and a (2)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("plan with a 1 MiB gap: %+v; want %+v", got, want)
	}

	// With no gap allowed, only back-to-back chunks merge; the header
	// chunk between two files keeps each file a request of its own.
	got = planPrefetch(toc, 4*MiB, 0)
	cFirst, _ := chunk("c")
	_, aLast := chunk("a")
	gFirst, _ := chunk("g")
	_, fLast := chunk("f")
	want = []prefetchRun{
		{first: gFirst, last: gLast, rank: 0},
		{first: cFirst, last: cLast, rank: 1},
		{first: aFirst, last: aLast, rank: 2},
		{first: fFirst, last: fLast, rank: 3},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("plan with no gap: %+v; want %+v", got, want)
	}
}

func TestPlanPrefetchBoundsRequests(t *testing.T) {
	const MiB = 1 << 20
	// 40 files of 512 KiB (256 KiB compressed), all listed, backwards.
	var order, list []string
	sizes := map[string]int64{}
	for i := range 40 {
		n := fmt.Sprintf("f%02d", i)
		order = append(order, n)
		sizes[n] = 512 << 10
		list = append([]string{n}, list...)
	}
	toc := layoutTOC(sizes, order, 1*MiB)
	toc.Prefetch = list
	runs := planPrefetch(toc, 4*MiB, 1*MiB)
	covered := map[int]bool{}
	for i, r := range runs {
		first, last := toc.Chunks[r.first], toc.Chunks[r.last-1]
		if n := last.CompressedOffset + last.CompressedSize - first.CompressedOffset; n > 4*MiB {
			t.Errorf("run %d is %d bytes; want at most max_coalesce", i, n)
		}
		if i > 0 && runs[i-1].rank > r.rank {
			t.Errorf("run %d (rank %d) after a run of rank %d; want the earliest listed first", i, r.rank, runs[i-1].rank)
		}
		for c := r.first; c < r.last; c++ {
			if covered[c] {
				t.Errorf("chunk %d planned twice", c)
			}
			covered[c] = true
		}
	}
	for _, n := range order {
		first, last := chunksOfFile(toc, n)
		for c := first; c < last; c++ {
			if !covered[c] {
				t.Errorf("chunk %d of listed file %s not planned", c, n)
			}
		}
	}
	// 40 x 256 KiB compressed (plus headers) in 4 MiB requests: 3, not 40.
	if len(runs) > 3 {
		t.Errorf("%d requests for 10 MiB of listed files; want 3", len(runs))
	}
	// The last file of the blob is listed first: its run goes first.
	if _, last := chunksOfFile(toc, "f39"); runs[0].last != last {
		t.Errorf("first run %+v does not hold f39, the first listed", runs[0])
	}
}

// TestPlanPrefetchRanges: a listed file with ranges is planned as the
// chunks those ranges touch, not the whole file; a listed file without
// ranges is planned whole.
func TestPlanPrefetchRanges(t *testing.T) {
	const MiB = 1 << 20
	order := []string{"modules", "small"}
	toc := layoutTOC(map[string]int64{"modules": 16 * MiB, "small": 40 << 10}, order, 1*MiB)
	toc.Prefetch = []string{"modules", "small"}
	// Parts of chunk 1 and chunk 2 of the file, and all of chunk 9.
	toc.PrefetchRanges = []artifact.FileRanges{{Name: "modules", Ranges: []artifact.Range{
		{Offset: MiB + 10, Size: MiB}, {Offset: 9 * MiB, Size: MiB}}}}
	got := planPrefetch(toc, 4*MiB, 0)
	mFirst, _ := chunksOfFile(toc, "modules")
	sFirst, sLast := chunksOfFile(toc, "small")
	want := []prefetchRun{
		{first: mFirst + 1, last: mFirst + 3, rank: 0},
		{first: mFirst + 9, last: mFirst + 10, rank: 0},
		{first: sFirst, last: sLast, rank: 1},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("plan with ranges: %+v; want %+v", got, want)
	}
	toc.PrefetchRanges = nil
	got = planPrefetch(toc, 32*MiB, 0)
	if _, mLast := chunksOfFile(toc, "modules"); len(got) != 2 || got[0].first != mFirst || got[0].last != mLast {
		t.Fatalf("plan without ranges: %+v; want all of modules's chunks [%d, %d) first", got, mFirst, mLast)
	}
}
