package cache

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// A pack is one file holding many small chunks, written together: the
// chunks of one fetched run. A file per small chunk costs the filesystem
// an inode, a directory entry and their writeback for a few kilobytes;
// a run of a small-file layer holds hundreds of chunks, and writing them
// one file each was the daemon's heaviest CPU work beside a starting
// container. A pack costs that once for the run.
//
// Layout, all integers big-endian:
//
//	magic    [8]byte  "STRMPK01"
//	count    uint32   number of chunks
//	entries  count × { sha256 [32]byte; size uint32 }
//	data     the chunks' bytes, back to back in entry order
//
// The file is made whole before it gets its name (as a chunk file is), so
// a crash leaves no torn pack; each chunk read from a pack is checked
// against its digest like a chunk file, so a damaged pack costs its
// damaged chunks and nothing else. Packs live in dir/packs under random
// names: they are never looked up by name, only listed on Open.
type pack struct {
	path  string
	ds    []digest.Digest // every chunk written in it, in file order
	bytes int64           // chunk bytes in the file, indexed or not
	live  int             // chunks of ds the index points at it
	file  packFile        // its open file, for reads (openPacks)
}

const (
	packDir        = "packs"
	packMagic      = "STRMPK01"
	packHeaderSize = len(packMagic) + 4
	packEntrySize  = 32 + 4
	// PackMaxChunk is the largest chunk a pack takes; larger chunks get a
	// file of their own, where the file's cost is small beside the bytes.
	PackMaxChunk = 256 << 10
	// packMaxCount bounds the chunks of one pack, written or read.
	packMaxCount = 1 << 16
)

// packEntry is a chunk's place in a pack file.
type packEntry struct {
	d    digest.Digest
	off  int64
	size int64
}

// encodePackHeader returns the header of a pack of chunks ds with bytes
// bs, and where each chunk lies in the file. Every d must be a valid
// sha256 digest.
func encodePackHeader(ds []digest.Digest, bs [][]byte) ([]byte, []packEntry, error) {
	if len(ds) != len(bs) || len(ds) == 0 || len(ds) > packMaxCount {
		return nil, nil, fmt.Errorf("pack of %d digests and %d chunks", len(ds), len(bs))
	}
	h := make([]byte, packHeaderSize, packHeaderSize+len(ds)*packEntrySize)
	copy(h, packMagic)
	binary.BigEndian.PutUint32(h[len(packMagic):], uint32(len(ds)))
	ents := make([]packEntry, len(ds))
	off := int64(packHeaderSize + len(ds)*packEntrySize)
	for i, d := range ds {
		raw, err := hex.DecodeString(d.Encoded())
		if err != nil || d.Algorithm() != digest.SHA256 || len(raw) != 32 {
			return nil, nil, fmt.Errorf("pack chunk %q: not a sha256 digest", d)
		}
		if len(bs[i]) > PackMaxChunk {
			return nil, nil, fmt.Errorf("pack chunk %s: %d bytes, over %d", d, len(bs[i]), PackMaxChunk)
		}
		h = append(h, raw...)
		h = binary.BigEndian.AppendUint32(h, uint32(len(bs[i])))
		ents[i] = packEntry{d: d, off: off, size: int64(len(bs[i]))}
		off += int64(len(bs[i]))
	}
	return h, ents, nil
}

// readPackHeader reads the header of the pack file f, of size bytes in
// all, and checks that the chunks it lists fill the rest of the file.
func readPackHeader(f io.ReaderAt, size int64) ([]packEntry, error) {
	var fixed [packHeaderSize]byte
	if _, err := f.ReadAt(fixed[:], 0); err != nil {
		return nil, fmt.Errorf("read pack header: %w", err)
	}
	if string(fixed[:len(packMagic)]) != packMagic {
		return nil, errors.New("not a pack file (bad magic)")
	}
	n := int64(binary.BigEndian.Uint32(fixed[len(packMagic):]))
	if n == 0 || n > packMaxCount {
		return nil, fmt.Errorf("pack header: %d chunks, want 1 to %d", n, packMaxCount)
	}
	off := int64(packHeaderSize) + n*packEntrySize
	if off > size {
		return nil, fmt.Errorf("pack header: %d chunks do not fit in %d bytes", n, size)
	}
	raw := make([]byte, n*packEntrySize)
	if _, err := f.ReadAt(raw, int64(packHeaderSize)); err != nil {
		return nil, fmt.Errorf("read pack entries: %w", err)
	}
	ents := make([]packEntry, n)
	for i := range ents {
		e := raw[int64(i)*packEntrySize:]
		sz := int64(binary.BigEndian.Uint32(e[32:]))
		if sz > PackMaxChunk {
			return nil, fmt.Errorf("pack entry %d: %d bytes, over %d", i, sz, PackMaxChunk)
		}
		ents[i] = packEntry{d: digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(e[:32])), off: off, size: sz}
		off += sz
	}
	if off != size {
		return nil, fmt.Errorf("pack of %d bytes lists chunks ending at %d", size, off)
	}
	return ents, nil
}

// writePack writes chunks ds (bytes bs) into a new pack file, whole or not
// at all, and returns its path and where each chunk lies in it.
func (s *Store) writePack(ds []digest.Digest, bs [][]byte) (string, []packEntry, error) {
	h, ents, err := encodePackHeader(ds, bs)
	if err != nil {
		return "", nil, err
	}
	var name [16]byte
	rand.Read(name[:])
	p := filepath.Join(s.dir, packDir, hex.EncodeToString(name[:]))
	if _, err := s.writeFile(p, append([][]byte{h}, bs...)...); err != nil {
		return "", nil, err
	}
	return p, ents, nil
}

// writeAll writes every byte of bs to fd, with as few system calls as
// writev allows.
func writeAll(fd int, bs [][]byte) error {
	iov := make([][]byte, 0, len(bs))
	for _, b := range bs {
		if len(b) > 0 {
			iov = append(iov, b)
		}
	}
	for len(iov) > 0 {
		n, err := unix.Writev(fd, iov[:min(len(iov), 1024)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("write: %w", io.ErrShortWrite)
		}
		for n > 0 {
			if n < len(iov[0]) {
				iov[0] = iov[0][n:]
				break
			}
			n -= len(iov[0])
			iov = iov[1:]
		}
	}
	return nil
}

// Verify reads every chunk stored in dir, in chunk files and packs,
// without opening a Store (a daemon may have it open), and checks each
// against its digest. It returns how many chunks it checked and an error
// per chunk or pack that failed, naming its file.
func Verify(dir string) (n int, bad []error, err error) {
	err = walkChunkFiles(dir, digest.SHA256, func(p string, de fs.DirEntry) error {
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		n++
		if digest.SHA256.FromBytes(b).Encoded() != de.Name() {
			bad = append(bad, fmt.Errorf("chunk file %s (%d bytes) does not hash to its name", p, len(b)))
		}
		return nil
	})
	if err != nil {
		return n, bad, fmt.Errorf("verify chunk files in %s: %w", dir, err)
	}
	packs, err := listPacks(dir)
	if err != nil {
		return n, bad, fmt.Errorf("verify packs in %s: %w", dir, err)
	}
	for _, de := range packs {
		p := filepath.Join(dir, packDir, de.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			return n, bad, fmt.Errorf("verify pack %s: %w", p, err)
		}
		ents, err := readPackHeader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			bad = append(bad, fmt.Errorf("pack %s: %w", p, err))
			continue
		}
		for _, e := range ents {
			n++
			if got := digest.SHA256.FromBytes(b[e.off : e.off+e.size]); got != e.d {
				bad = append(bad, fmt.Errorf("pack %s: chunk %s at %d (%d bytes) hashes to %s", p, e.d, e.off, e.size, got))
			}
		}
	}
	return n, bad, nil
}
