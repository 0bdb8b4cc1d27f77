package converter

import (
	"archive/tar"
	"bytes"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// tarEntry is one entry of a generated test tar.
type tarEntry struct {
	hdr  tar.Header
	data []byte
}

// buildTar writes entries as a tar in the given format, then appends pad
// zero bytes after the end-of-archive marker (as GNU tar's record padding).
func buildTar(t testing.TB, format tar.Format, entries []tarEntry, pad int) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i := range entries {
		h := entries[i].hdr
		h.Format = format
		if format == tar.FormatGNU {
			h.PAXRecords = nil // GNU format has no PAX records
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(entries[i].data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("write header %q: %v", h.Name, err)
		}
		if _, err := tw.Write(entries[i].data); err != nil {
			t.Fatalf("write data %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatalf("close tar: %v", err)
	}
	buf.Write(make([]byte, pad))
	return buf.Bytes()
}

var baseTime = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

// fileData returns n bytes, compressible or random.
func fileData(rng *rand.Rand, n int, compressible bool) []byte {
	b := make([]byte, n)
	if compressible {
		words := []string{"lorem ", "ipsum ", "dolor ", "sit ", "amet\n", "streamer ", "chunk "}
		for i := 0; i < n; {
			i += copy(b[i:], words[rng.IntN(len(words))])
		}
		return b
	}
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// everyTypeEntries returns one entry of every kind the converter handles,
// with PAX records, xattrs, long names and owners, plus regular files of
// the boundary sizes around chunkSize.
func everyTypeEntries(rng *rand.Rand, chunkSize int) []tarEntry {
	long := strings.Repeat("long-directory-name/", 8) + "file-with-a-name-longer-than-one-hundred-bytes"
	m := func(name string, typ byte, mode int64) tar.Header {
		return tar.Header{Name: name, Typeflag: typ, Mode: mode, Uid: 1000 + rng.IntN(10), Gid: 100, Uname: "user", Gname: "group", ModTime: baseTime.Add(time.Duration(rng.IntN(1e6)) * time.Second)}
	}
	es := []tarEntry{
		{hdr: m("./", tar.TypeDir, 0o755)},
		{hdr: m("./etc/", tar.TypeDir, 0o755)},
		{hdr: m("./etc/hostname", tar.TypeReg, 0o644), data: []byte("host\n")},
		{hdr: m("./etc/empty", tar.TypeReg, 0o600)},
		{hdr: m("etc/hard", tar.TypeLink, 0o644)},
		{hdr: m("etc/link", tar.TypeSymlink, 0o777)},
		{hdr: m("dev/", tar.TypeDir, 0o755)},
		{hdr: m("dev/null", tar.TypeChar, 0o666)},
		{hdr: m("dev/sda", tar.TypeBlock, 0o660)},
		{hdr: m("dev/fifo", tar.TypeFifo, 0o644)},
		{hdr: m("usr/.wh.removed", tar.TypeReg, 0o644)},
		{hdr: m("opt/.wh..wh..opq", tar.TypeReg, 0o644)},
		{hdr: m("bin/ping", tar.TypeReg, 0o4755), data: fileData(rng, 3000, false)},
		{hdr: m(long, tar.TypeReg, 0o644), data: fileData(rng, 700, true)},
		{hdr: m("sbin/"+strings.Repeat("l", 150), tar.TypeSymlink, 0o777)},
	}
	es[4].hdr.Linkname = "./etc/hostname"
	es[5].hdr.Linkname = "../etc/hostname"
	es[7].hdr.Devmajor, es[7].hdr.Devminor = 1, 3
	es[8].hdr.Devmajor, es[8].hdr.Devminor = 8, 0
	es[12].hdr.PAXRecords = map[string]string{
		"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
		"SCHILY.xattr.user.empty":          "",
	}
	es[14].hdr.Linkname = strings.Repeat("t", 200)
	for i, n := range []int{1, chunkSize - 1, chunkSize, chunkSize + 1, 2*chunkSize + 7, 3 * chunkSize} {
		es = append(es, tarEntry{hdr: m(fmt.Sprintf("data/size-%d", n), tar.TypeReg, 0o644), data: fileData(rng, n, i%2 == 0)})
	}
	return es
}

// randomEntries returns n random entries of every type under prefix,
// regular files of random sizes up to maxSize.
func randomEntries(rng *rand.Rand, prefix string, n, maxSize int) []tarEntry {
	es := make([]tarEntry, 0, n)
	var regs []string
	for i := range n {
		h := tar.Header{
			Name:    fmt.Sprintf("%sd%d/f%d", prefix, rng.IntN(5), i),
			Mode:    int64(rng.IntN(0o7777)),
			Uid:     rng.IntN(70000),
			Gid:     rng.IntN(70000),
			ModTime: baseTime.Add(time.Duration(rng.Int64N(1e9)) * time.Second),
		}
		if rng.IntN(7) == 0 {
			h.Name = strings.Repeat("x", 100+rng.IntN(200)) + h.Name
		}
		var data []byte
		switch k := rng.IntN(10); {
		case k < 5 || len(regs) == 0:
			h.Typeflag = tar.TypeReg
			size := rng.IntN(maxSize + 1)
			if rng.IntN(4) == 0 {
				size = 0
			}
			data = fileData(rng, size, rng.IntN(2) == 0)
			regs = append(regs, h.Name)
		case k == 5:
			h.Typeflag = tar.TypeDir
		case k == 6:
			h.Typeflag, h.Linkname = tar.TypeSymlink, "target/"+fmt.Sprint(rng.IntN(100))
		case k == 7:
			h.Typeflag, h.Linkname = tar.TypeLink, regs[rng.IntN(len(regs))]
		case k == 8:
			h.Typeflag, h.Devmajor, h.Devminor = tar.TypeChar, int64(rng.IntN(256)), int64(rng.IntN(256))
		default:
			h.Typeflag = tar.TypeFifo
		}
		if rng.IntN(5) == 0 {
			h.PAXRecords = map[string]string{"SCHILY.xattr.user.k": fmt.Sprint(rng.Int())}
		}
		es = append(es, tarEntry{hdr: h, data: data})
	}
	return es
}
