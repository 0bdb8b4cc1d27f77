package artifact

import (
	"errors"
	"strings"

	"github.com/opencontainers/go-digest"
	"testing"
)

func TestValidateRejects(t *testing.T) {
	s := newSample(t)
	long := strings.Repeat("x", DefaultLimits.MaxNameLen+1)
	tests := []struct {
		name   string
		lim    Limits
		mutate func(tb testing.TB, toc *TOC)
		want   string // substring of the error
	}{
		{"version", Limits{}, func(_ testing.TB, toc *TOC) { toc.Version = 2 }, "version 2"},
		{"layer digest empty", Limits{}, func(_ testing.TB, toc *TOC) { toc.Layer = "" }, "layer:"},
		{"layer digest not sha256", Limits{}, func(_ testing.TB, toc *TOC) { toc.Layer = "sha512:abc" }, "layer:"},
		{"diffID malformed", Limits{}, func(_ testing.TB, toc *TOC) { toc.DiffID = "sha256:XYZ" }, "diffID:"},
		{"chunk size too small", Limits{}, func(_ testing.TB, toc *TOC) { toc.ChunkSize = MinChunkSize - 1 }, "chunk size"},
		{"chunk size too large", Limits{}, func(_ testing.TB, toc *TOC) { toc.ChunkSize = MaxChunkSize + 1 }, "chunk size"},
		{"tar size over limit", Limits{MaxTarSize: 1000}, func(_ testing.TB, toc *TOC) {}, "tar size"},
		{"negative tar size", Limits{}, func(_ testing.TB, toc *TOC) { toc.TarSize = -1 }, "tar size"},
		{"negative blob size", Limits{}, func(_ testing.TB, toc *TOC) { toc.BlobSize = -1 }, "blob size"},
		{"too many entries", Limits{MaxEntries: 3}, func(_ testing.TB, toc *TOC) {}, "entries, limit 3"},
		{"too many chunks", Limits{MaxChunks: 2}, func(_ testing.TB, toc *TOC) {}, "chunks, limit 2"},
		{"chunk gap", Limits{}, func(_ testing.TB, toc *TOC) { toc.Chunks[1].Offset++ }, "chunk 1: offset"},
		{"chunk overlap", Limits{}, func(_ testing.TB, toc *TOC) { toc.Chunks[2].Offset-- }, "chunk 2: offset"},
		{"first chunk not at 0", Limits{}, func(_ testing.TB, toc *TOC) { toc.Chunks[0].Offset = 1 }, "chunk 0: offset"},
		{"chunk size zero", Limits{}, func(_ testing.TB, toc *TOC) { toc.Chunks[3].Size = 0 }, "chunk 3: size 0"},
		{"chunk larger than chunk size", Limits{}, func(_ testing.TB, toc *TOC) {
			toc.ChunkSize = MinChunkSize
			toc.Chunks[3].Size = MinChunkSize + 1
		}, "chunk 3: size"},
		{"chunks short of tar size", Limits{}, func(_ testing.TB, toc *TOC) { toc.TarSize++ }, "chunks cover"},
		{"chunks past tar size", Limits{}, func(_ testing.TB, toc *TOC) { toc.TarSize-- }, "past tar size"},
		{"no chunks for data", Limits{}, func(_ testing.TB, toc *TOC) { toc.Chunks = nil }, "chunks cover 0"},
		{"frame gap", Limits{}, func(_ testing.TB, toc *TOC) { toc.Chunks[2].CompressedOffset++ }, "chunk 2: compressed offset"},
		{"frame size zero", Limits{}, func(_ testing.TB, toc *TOC) { toc.Chunks[0].CompressedSize = 0 }, "chunk 0: compressed size"},
		{"frame too large", Limits{}, func(_ testing.TB, toc *TOC) {
			toc.Chunks[3].CompressedSize = MaxCompressedSize(toc.Chunks[3].Size) + 1
		}, "chunk 3: compressed size"},
		{"frames short of blob size", Limits{}, func(_ testing.TB, toc *TOC) { toc.BlobSize++ }, "frames cover"},
		{"frames past blob size", Limits{}, func(_ testing.TB, toc *TOC) { toc.BlobSize-- }, "past blob size"},
		{"chunk digest malformed", Limits{}, func(_ testing.TB, toc *TOC) { toc.Chunks[1].Digest = "sha256:00" }, "chunk 1:"},
		{"chunk digest other algorithm", Limits{}, func(_ testing.TB, toc *TOC) { toc.Chunks[1].Digest = "md5:00" }, "chunk 1:"},
		{"empty name", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "" }, "empty name"},
		{"absolute name", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "/run/fifo" }, "absolute"},
		{"root name", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "." }, "root"},
		{"dot prefix", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "./run/fifo" }, "not clean"},
		{"double slash", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "run//fifo" }, "not clean"},
		{"trailing slash", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc").Name = "etc/" }, "trailing slash"},
		{"traversal", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "../../etc/shadow" }, "escapes"},
		{"dotdot", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = ".." }, "escapes"},
		{"inner traversal", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "run/../../x" }, "escapes"},
		{"NUL in name", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "run/f\x00ifo" }, "NUL"},
		{"name too long", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = long }, "longer than"},
		{"duplicate", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "etc/passwd" }, "duplicates entry 1"},
		{"below a file", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "etc/passwd/x" }, "lies below"},
		{"deep below a file", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "a-b/c/d/e" }, "lies below"},
		{"file parent listed after its child", Limits{}, func(_ testing.TB, toc *TOC) {
			toc.Entries = append([]Entry{{Name: "zz/a/b", Type: TypeDir}}, toc.Entries...)
			toc.Entries = append(toc.Entries, Entry{Name: "zz", Type: TypeFifo})
		}, "lies below"},
		{"below a symlink", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Name = "usr/bin/env/x" }, "lies below"},
		{"unknown type", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Type = "socket" }, "unknown type"},
		{"mode file type bits", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc").Mode = 0o40755 }, "mode"},
		{"negative mode", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc").Mode = -1 }, "mode"},
		{"negative uid", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc").UID = -1 }, "uid"},
		{"long uname", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc").Uname = long }, "user or group"},
		{"negative size", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc/passwd").Size = -1 }, "negative size"},
		{"size on a dir", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc").Size = 1 }, "size 1 on a dir"},
		{"offset on a dir", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc").Offset = MinChunkSize }, "offset on a dir"},
		{"negative offset", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc/passwd").Offset = -1 }, "offset -1"},
		{"file past tar end", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "bin/sh").Size = toc.TarSize }, "past tar size"},
		{"file size overflow", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "bin/sh").Size = 1<<63 - 1 }, "past tar size"},
		{"offset not on chunk boundary", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc/passwd").Offset++ }, "not a chunk boundary"},
		{"hardlink to later entry", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "bin/busybox").Linkname = "run/fifo" }, "not an earlier entry"},
		{"hardlink to missing", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "bin/busybox").Linkname = "nope" }, "not an earlier entry"},
		{"hardlink to itself", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "bin/busybox").Linkname = "bin/busybox" }, "not an earlier entry"},
		{"hardlink to dir", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "bin/busybox").Linkname = "bin" }, "is a dir"},
		{"hardlink to hardlink", Limits{}, func(tb testing.TB, toc *TOC) {
			e := entry(tb, toc, "run/fifo")
			*e = Entry{Name: "run/fifo", Type: TypeHardlink, Linkname: "bin/busybox"}
		}, "is a hardlink"},
		{"hardlink size differs", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "bin/busybox").Size = 3 }, "differs"},
		{"symlink empty target", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "usr/bin/env").Linkname = "" }, "empty symlink"},
		{"symlink long target", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "usr/bin/env").Linkname = long }, "symlink target"},
		{"linkname on file", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "etc/passwd").Linkname = "x" }, "link name on a reg"},
		{"device major out of range", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "dev/null").Devmajor = MaxDevMajor + 1 }, "out of range"},
		{"device minor negative", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "dev/sda").Devminor = -1 }, "out of range"},
		{"device numbers on fifo", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "run/fifo").Devmajor = 1 }, "device numbers"},
		{"too many xattrs", Limits{MaxXattrs: 1}, func(tb testing.TB, toc *TOC) {
			entry(tb, toc, "bin/sh").Xattrs["user.a"] = nil
		}, "xattrs, limit 1"},
		{"xattr empty name", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "bin/sh").Xattrs[""] = nil }, "xattr name"},
		{"xattr long name", Limits{}, func(tb testing.TB, toc *TOC) { entry(tb, toc, "bin/sh").Xattrs[long] = nil }, "xattr name"},
		{"xattr large value", Limits{}, func(tb testing.TB, toc *TOC) {
			entry(tb, toc, "bin/sh").Xattrs["user.big"] = make([]byte, MaxXattrValueLen+1)
		}, "value longer"},
		{"prefetch missing", Limits{}, func(_ testing.TB, toc *TOC) { toc.Prefetch = append(toc.Prefetch, "nope") }, "prefetch 3"},
		{"prefetch dir", Limits{}, func(_ testing.TB, toc *TOC) { toc.Prefetch = []string{"etc"} }, "want a regular file"},
		{"prefetch symlink", Limits{}, func(_ testing.TB, toc *TOC) { toc.Prefetch = []string{"usr/bin/env"} }, "want a regular file"},
		{"prefetch duplicate", Limits{}, func(_ testing.TB, toc *TOC) { toc.Prefetch = []string{"bin/sh", "bin/sh"} }, "listed twice"},
		{"prefetch ranges unlisted", Limits{}, func(_ testing.TB, toc *TOC) {
			toc.PrefetchRanges = append(toc.PrefetchRanges, FileRanges{Name: "a/b", Ranges: []Range{{0, 1}}})
		}, "not in the prefetch list"},
		{"prefetch ranges twice", Limits{}, func(_ testing.TB, toc *TOC) {
			toc.PrefetchRanges = append(toc.PrefetchRanges, toc.PrefetchRanges[0])
		}, "given twice"},
		{"prefetch ranges empty", Limits{}, func(_ testing.TB, toc *TOC) { toc.PrefetchRanges[0].Ranges = nil }, "no range"},
		{"prefetch range empty", Limits{}, func(_ testing.TB, toc *TOC) { toc.PrefetchRanges[0].Ranges[1].Size = 0 }, "empty, out of order"},
		{"prefetch range negative", Limits{}, func(_ testing.TB, toc *TOC) { toc.PrefetchRanges[0].Ranges[0].Offset = -1 }, "empty, out of order"},
		{"prefetch ranges overlap", Limits{}, func(_ testing.TB, toc *TOC) { toc.PrefetchRanges[0].Ranges[1].Offset = 99 }, "overlapping"},
		{"prefetch range past the file", Limits{}, func(_ testing.TB, toc *TOC) { toc.PrefetchRanges[0].Ranges[1].Size = 51 }, "beyond the file's"},
		{"prefetch range overflow", Limits{}, func(_ testing.TB, toc *TOC) {
			toc.PrefetchRanges[0].Ranges[1] = Range{Offset: 1 << 62, Size: 1 << 62}
		}, "beyond the file's"},
		{"prefetch ranges of a hardlink", Limits{}, func(_ testing.TB, toc *TOC) {
			toc.PrefetchRanges = append(toc.PrefetchRanges, FileRanges{Name: "bin/busybox", Ranges: []Range{{MinChunkSize, 51}}})
		}, "beyond the file's"},
		{"prefetch ranges over the limit", Limits{MaxChunks: 4}, func(_ testing.TB, toc *TOC) {
			toc.PrefetchRanges[0].Ranges = []Range{{0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 1}}
		}, "prefetch ranges, limit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			toc := cloneTOC(s.toc)
			tt.mutate(t, toc)
			err := toc.Validate(tt.lim)
			if err == nil {
				t.Fatalf("Validate accepted the TOC, want an error containing %q", tt.want)
			}
			if !errors.Is(err, ErrInvalidTOC) {
				t.Errorf("error %v does not wrap ErrInvalidTOC", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

func TestValidateAccepts(t *testing.T) {
	s := newSample(t)
	tests := []struct {
		name   string
		mutate func(tb testing.TB, toc *TOC)
	}{
		{"sample", func(testing.TB, *TOC) {}},
		{"empty layer", func(_ testing.TB, toc *TOC) {
			toc.Entries, toc.Chunks, toc.Prefetch, toc.PrefetchRanges, toc.TarSize, toc.BlobSize = nil, nil, nil, nil, 0, 0
		}},
		{"empty file anywhere", func(tb testing.TB, toc *TOC) { entry(tb, toc, ".wh.old").Offset = 17 }},
		{"file at tar end", func(tb testing.TB, toc *TOC) {
			last := toc.Chunks[len(toc.Chunks)-1]
			e := entry(tb, toc, "a/b")
			e.Offset, e.Size = last.Offset, last.Size
		}},
		{"child before parent dir", func(tb testing.TB, toc *TOC) {
			toc.Entries = append([]Entry{{Name: "z/y", Type: TypeDir}}, toc.Entries...)
			toc.Entries = append(toc.Entries, Entry{Name: "z", Type: TypeDir})
		}},
		{"hardlink carries target size", func(tb testing.TB, toc *TOC) {
			entry(tb, toc, "bin/busybox").Size = entry(tb, toc, "bin/sh").Size
		}},
		{"max device numbers", func(tb testing.TB, toc *TOC) {
			e := entry(tb, toc, "dev/null")
			e.Devmajor, e.Devminor = MaxDevMajor, MaxDevMinor
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			toc := cloneTOC(s.toc)
			tt.mutate(t, toc)
			if err := toc.Validate(Limits{}); err != nil {
				t.Fatalf("Validate: %v", err)
			}
		})
	}
}

func TestHashStep(t *testing.T) {
	// Equal strings hash equal, and prefixes hash as the rolling hash saw them.
	const base = 1<<40 + 12345
	h := func(s string) uint64 {
		var h uint64
		for i := 0; i < len(s); i++ {
			h = hashStep(h, base, s[i])
		}
		return h
	}
	if h("usr/bin") != h("usr/bin") || h("usr/bin") == h("usr/bim") || h("a") == h("a\x00") {
		t.Errorf("hashStep does not distinguish names")
	}
	if got := hashStep(hashPrime-1, hashPrime-1, 255); got >= hashPrime {
		t.Errorf("hashStep result %d not reduced", got)
	}
}

// BenchmarkValidateDeepNames measures validation of a TOC with many deep names, the
// shape a hostile TOC would use to make validation slow.
func BenchmarkValidateDeepNames(b *testing.B) {
	s := newSample(b)
	toc := cloneTOC(s.toc)
	deep := strings.Repeat("d/", 1000)
	for i := range 20000 {
		toc.Entries = append(toc.Entries, Entry{Name: deep + strings.Repeat("f", i%50+1) + "/" + string(rune('a'+i%26)) + string(rune('a'+i/26%26)) + string(rune('a'+i/676)), Type: TypeDir})
	}
	b.ResetTimer()
	for b.Loop() {
		if err := toc.Validate(Limits{}); err != nil {
			b.Fatal(err)
		}
	}
}

func TestValidSHA256(t *testing.T) {
	hex := strings.Repeat("0123456789abcdef", 4)
	for _, tc := range []struct {
		d  string
		ok bool
	}{
		{"sha256:" + hex, true},
		{"sha256:" + strings.ToUpper(hex), false},
		{"sha256:" + hex[:63], false},
		{"sha256:" + hex + "0", false},
		{"sha256:" + hex[:63] + "g", false},
		{"sha512:" + hex + hex, false},
		{"sha256" + hex, false},
		{"", false},
	} {
		if err := validSHA256(digest.Digest(tc.d)); (err == nil) != tc.ok {
			t.Errorf("validSHA256(%q) = %v; want ok %v", tc.d, err, tc.ok)
		}
	}
}
