package artifact

import (
	"fmt"
	"math/bits"
	"math/rand/v2"
	"path"
	"sort"
	"strings"

	"github.com/opencontainers/go-digest"
)

// Limits bound what a decoder accepts. Zero fields take the defaults.
type Limits struct {
	MaxTOCBytes int64 // uncompressed TOC JSON size
	MaxEntries  int
	MaxChunks   int
	MaxNameLen  int
	MaxXattrs   int   // per entry
	MaxTarSize  int64 // uncompressed layer size
}

// DefaultLimits are generous for real images and small enough that a
// hostile TOC cannot exhaust a node's memory.
var DefaultLimits = Limits{
	MaxTOCBytes: 512 << 20,
	MaxEntries:  2_000_000,
	MaxChunks:   4_000_000,
	MaxNameLen:  4096,
	MaxXattrs:   128,
	MaxTarSize:  1 << 42,
}

// Fixed bounds that follow from Linux rather than from policy.
const (
	// MaxXattrNameLen is XATTR_NAME_MAX.
	MaxXattrNameLen = 255
	// MaxXattrValueLen is XATTR_SIZE_MAX.
	MaxXattrValueLen = 64 << 10
	// MaxUserNameLen bounds Uname and Gname.
	MaxUserNameLen = 256
	// MaxDevMajor and MaxDevMinor are the largest device numbers Linux
	// encodes in a dev_t (12-bit major, 20-bit minor).
	MaxDevMajor = 1<<12 - 1
	MaxDevMinor = 1<<20 - 1
)

// MaxCompressedSize is the largest frame accepted for a chunk of size
// uncompressed bytes. zstd never expands data by more than a few bytes per
// 128 KiB block plus a frame header and checksum; the bound is generous so
// that any encoder passes, and tight enough to bound a range read.
func MaxCompressedSize(size int64) int64 {
	return size + size/8 + 1024
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	if l.MaxTOCBytes > 0 {
		d.MaxTOCBytes = l.MaxTOCBytes
	}
	if l.MaxEntries > 0 {
		d.MaxEntries = l.MaxEntries
	}
	if l.MaxChunks > 0 {
		d.MaxChunks = l.MaxChunks
	}
	if l.MaxNameLen > 0 {
		d.MaxNameLen = l.MaxNameLen
	}
	if l.MaxXattrs > 0 {
		d.MaxXattrs = l.MaxXattrs
	}
	if l.MaxTarSize > 0 {
		d.MaxTarSize = l.MaxTarSize
	}
	return d
}

// Validate checks every rule of docs/format.md and returns an error wrapping
// ErrInvalidTOC that names the first offending entry or chunk. A TOC that
// passes can be served without further checks: names are safe to join under
// a mount point, hardlinks form no cycles, every byte range of a regular file
// lies inside the chunk table, and ChunkRange is well defined.
func (t *TOC) Validate(lim Limits) error {
	lim = lim.withDefaults()
	if err := t.validateHeader(lim); err != nil {
		return err
	}
	if err := t.validateChunks(); err != nil {
		return err
	}
	byName, err := t.validateEntries(lim)
	if err != nil {
		return err
	}
	return t.validatePrefetch(byName)
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidTOC}, args...)...)
}

// validSHA256 reports whether d is a well-formed sha256 digest.
func validSHA256(d digest.Digest) error {
	// A TOC holds tens of thousands of digests: check the canonical form
	// directly before falling back to the library's (regexp) check, which
	// also gives the error message.
	if len(d) == 7+64 && d[:7] == "sha256:" && isLowerHex(string(d[7:])) {
		return nil
	}
	// Validate first: Algorithm panics on a digest without a separator.
	if err := d.Validate(); err != nil {
		return fmt.Errorf("digest %q: %v", short(string(d)), err)
	}
	if d.Algorithm() != digest.SHA256 {
		return fmt.Errorf("digest %q is not sha256", short(string(d)))
	}
	return nil
}

// short keeps hostile input out of error messages at full length.
func short(s string) string {
	const max = 128
	if len(s) <= max {
		return s
	}
	return s[:max] + "..."
}

func (t *TOC) validateHeader(lim Limits) error {
	if t.Version != TOCVersion {
		return invalid("version %d, want %d", t.Version, TOCVersion)
	}
	if err := validSHA256(t.Layer); err != nil {
		return invalid("layer: %v", err)
	}
	if err := validSHA256(t.DiffID); err != nil {
		return invalid("diffID: %v", err)
	}
	if t.ChunkSize < MinChunkSize || t.ChunkSize > MaxChunkSize {
		return invalid("chunk size %d outside [%d, %d]", t.ChunkSize, MinChunkSize, MaxChunkSize)
	}
	if t.TarSize < 0 || t.TarSize > lim.MaxTarSize {
		return invalid("tar size %d outside [0, %d]", t.TarSize, lim.MaxTarSize)
	}
	if t.BlobSize < 0 {
		return invalid("blob size %d is negative", t.BlobSize)
	}
	if len(t.Entries) > lim.MaxEntries {
		return invalid("%d entries, limit %d", len(t.Entries), lim.MaxEntries)
	}
	if len(t.Chunks) > lim.MaxChunks {
		return invalid("%d chunks, limit %d", len(t.Chunks), lim.MaxChunks)
	}
	if len(t.Prefetch) > len(t.Entries) {
		return invalid("%d prefetch names for %d entries", len(t.Prefetch), len(t.Entries))
	}
	if len(t.PrefetchRanges) > len(t.Prefetch) {
		return invalid("ranges for %d prefetch names, %d listed", len(t.PrefetchRanges), len(t.Prefetch))
	}
	n := 0
	for _, fr := range t.PrefetchRanges {
		n += len(fr.Ranges)
	}
	if n > lim.MaxChunks {
		return invalid("%d prefetch ranges, limit %d", n, lim.MaxChunks)
	}
	return nil
}

// validateChunks checks that the chunk table tiles the tar and the blob
// exactly, in order, with no gap and no overlap. Sums cannot overflow: each
// size is bounded by MaxChunkSize and the count by Limits.MaxChunks.
func (t *TOC) validateChunks() error {
	var off, coff int64
	for i, c := range t.Chunks {
		if c.Offset != off {
			return invalid("chunk %d: offset %d, want %d (chunks must be contiguous from 0)", i, c.Offset, off)
		}
		if c.Size <= 0 || c.Size > t.ChunkSize {
			return invalid("chunk %d: size %d outside (0, %d]", i, c.Size, t.ChunkSize)
		}
		if c.CompressedOffset != coff {
			return invalid("chunk %d: compressed offset %d, want %d (frames must be contiguous from 0)", i, c.CompressedOffset, coff)
		}
		if c.CompressedSize <= 0 || c.CompressedSize > MaxCompressedSize(c.Size) {
			return invalid("chunk %d: compressed size %d outside (0, %d]", i, c.CompressedSize, MaxCompressedSize(c.Size))
		}
		if err := validSHA256(c.Digest); err != nil {
			return invalid("chunk %d: %v", i, err)
		}
		off += c.Size
		coff += c.CompressedSize
		if off > t.TarSize {
			return invalid("chunk %d: ends at %d, past tar size %d", i, off, t.TarSize)
		}
		if coff > t.BlobSize {
			return invalid("chunk %d: frame ends at %d, past blob size %d", i, coff, t.BlobSize)
		}
	}
	if off != t.TarSize {
		return invalid("chunks cover %d bytes, tar size is %d", off, t.TarSize)
	}
	if coff != t.BlobSize {
		return invalid("frames cover %d bytes, blob size is %d", coff, t.BlobSize)
	}
	return nil
}

// chunkStartsAt reports whether a chunk starts exactly at off. Chunks are
// sorted by offset once validateChunks has passed.
func (t *TOC) chunkStartsAt(off int64) bool {
	i := sort.Search(len(t.Chunks), func(i int) bool { return t.Chunks[i].Offset >= off })
	return i < len(t.Chunks) && t.Chunks[i].Offset == off
}

// validName checks that name is a clean relative path that stays inside
// the layer when joined to a mount point.
func validName(name string, maxLen int) error {
	switch {
	case name == "":
		return fmt.Errorf("empty name")
	case len(name) > maxLen:
		return fmt.Errorf("name longer than %d bytes", maxLen)
	case strings.IndexByte(name, 0) >= 0:
		return fmt.Errorf("name contains NUL")
	case name == ".":
		return fmt.Errorf("name is the layer root")
	case name[0] == '/':
		return fmt.Errorf("name is absolute")
	case name[len(name)-1] == '/':
		return fmt.Errorf("name has a trailing slash")
	case name == ".." || strings.HasPrefix(name, "../") || strings.HasSuffix(name, "/..") || strings.Contains(name, "/../"):
		return fmt.Errorf("name escapes the layer root")
	case path.Clean(name) != name:
		return fmt.Errorf("name is not clean (want %q)", short(path.Clean(name)))
	}
	return nil
}

func (t *TOC) validateEntries(lim Limits) (map[string]int, error) {
	byName := make(map[string]int, len(t.Entries))
	for i := range t.Entries {
		e := &t.Entries[i]
		if err := validName(e.Name, lim.MaxNameLen); err != nil {
			return nil, invalid("entry %d (%q): %v", i, short(e.Name), err)
		}
		if j, dup := byName[e.Name]; dup {
			return nil, invalid("entry %d (%q): duplicates entry %d", i, short(e.Name), j)
		}
		if err := t.validateEntry(e, byName, lim); err != nil {
			return nil, invalid("entry %d (%q): %v", i, short(e.Name), err)
		}
		byName[e.Name] = i
	}
	if err := t.validateTree(); err != nil {
		return nil, err
	}
	return byName, nil
}

// validateEntry checks one entry's metadata. byName holds the entries
// before it, so a hardlink can only point backwards: no cycles.
func (t *TOC) validateEntry(e *Entry, byName map[string]int, lim Limits) error {
	if e.Mode < 0 || e.Mode&^07777 != 0 {
		return fmt.Errorf("mode %#o has bits outside 07777", e.Mode)
	}
	if e.UID < 0 || e.GID < 0 {
		return fmt.Errorf("negative uid %d or gid %d", e.UID, e.GID)
	}
	if len(e.Uname) > MaxUserNameLen || len(e.Gname) > MaxUserNameLen {
		return fmt.Errorf("user or group name longer than %d bytes", MaxUserNameLen)
	}
	if e.Size < 0 {
		return fmt.Errorf("negative size %d", e.Size)
	}
	if e.Offset < 0 || e.Offset > t.TarSize {
		return fmt.Errorf("offset %d outside [0, %d]", e.Offset, t.TarSize)
	}
	if err := validXattrs(e.Xattrs, lim.MaxXattrs); err != nil {
		return err
	}
	isDev := e.Type == TypeChar || e.Type == TypeBlock
	if !isDev && (e.Devmajor != 0 || e.Devminor != 0) {
		return fmt.Errorf("device numbers on a %s entry", e.Type)
	}
	if e.Type != TypeSymlink && e.Type != TypeHardlink && e.Linkname != "" {
		return fmt.Errorf("link name on a %s entry", e.Type)
	}
	if e.Type != TypeReg && e.Type != TypeHardlink && e.Size != 0 {
		return fmt.Errorf("size %d on a %s entry", e.Size, e.Type)
	}
	if e.Type != TypeReg && e.Offset != 0 {
		return fmt.Errorf("data offset on a %s entry", e.Type)
	}
	switch e.Type {
	case TypeReg:
		if e.Size > t.TarSize-e.Offset {
			return fmt.Errorf("data [%d, +%d) ends past tar size %d", e.Offset, e.Size, t.TarSize)
		}
		// File data starts on a chunk boundary so identical files share
		// chunk digests, and a file read never needs a neighbour's chunk
		// for its first bytes.
		if e.Size > 0 && !t.chunkStartsAt(e.Offset) {
			return fmt.Errorf("data offset %d is not a chunk boundary", e.Offset)
		}
	case TypeDir, TypeFifo:
	case TypeSymlink:
		if e.Linkname == "" {
			return fmt.Errorf("empty symlink target")
		}
		if len(e.Linkname) > lim.MaxNameLen || strings.IndexByte(e.Linkname, 0) >= 0 {
			return fmt.Errorf("symlink target longer than %d bytes or contains NUL", lim.MaxNameLen)
		}
	case TypeHardlink:
		j, ok := byName[e.Linkname]
		if !ok {
			return fmt.Errorf("hardlink target %q is not an earlier entry", short(e.Linkname))
		}
		target := &t.Entries[j]
		if target.Type != TypeReg {
			return fmt.Errorf("hardlink target %q is a %s, want a regular file", short(e.Linkname), target.Type)
		}
		if e.Size != 0 && e.Size != target.Size {
			return fmt.Errorf("hardlink size %d differs from target size %d", e.Size, target.Size)
		}
	case TypeChar, TypeBlock:
		if e.Devmajor < 0 || e.Devmajor > MaxDevMajor || e.Devminor < 0 || e.Devminor > MaxDevMinor {
			return fmt.Errorf("device %d:%d out of range", e.Devmajor, e.Devminor)
		}
	default:
		return fmt.Errorf("unknown type %q", short(string(e.Type)))
	}
	return nil
}

func validXattrs(x map[string][]byte, max int) error {
	if len(x) > max {
		return fmt.Errorf("%d xattrs, limit %d", len(x), max)
	}
	for k, v := range x {
		if k == "" || len(k) > MaxXattrNameLen || strings.IndexByte(k, 0) >= 0 {
			return fmt.Errorf("xattr name %q empty, longer than %d bytes or contains NUL", short(k), MaxXattrNameLen)
		}
		if len(v) > MaxXattrValueLen {
			return fmt.Errorf("xattr %q value longer than %d bytes", short(k), MaxXattrValueLen)
		}
	}
	return nil
}

// validateTree rejects an entry below a non-directory ("a" a file and
// "a/b" another entry), which no filesystem can represent, in either tar
// order. Hashing every proper prefix of every name would cost
// O(length x depth) per name, which a hostile TOC of deep names turns into
// minutes; instead a rolling hash yields every prefix's hash in one pass,
// so the check is linear in the total length of the names. Hash hits are
// confirmed by comparing strings; the hash is a polynomial modulo the prime
// 2^61-1 with a random base, so an attacker cannot make hits frequent.
func (t *TOC) validateTree() error {
	base := uint64(rand.N(uint64(hashPrime-1<<32))) + 1<<32
	hash := func(s string) uint64 {
		var h uint64
		for i := 0; i < len(s); i++ {
			h = hashStep(h, base, s[i])
		}
		return h
	}
	nonDir := make(map[uint64]int32)
	var collided map[uint64][]int32 // distinct names with equal hashes
	for i := range t.Entries {
		if t.Entries[i].Type == TypeDir {
			continue
		}
		h := hash(t.Entries[i].Name)
		if _, ok := nonDir[h]; !ok {
			nonDir[h] = int32(i)
			continue
		}
		if collided == nil {
			collided = make(map[uint64][]int32)
		}
		collided[h] = append(collided[h], int32(i))
	}
	if len(nonDir) == 0 {
		return nil
	}
	lookup := func(h uint64, name string) (int32, bool) {
		if j, ok := nonDir[h]; ok && t.Entries[j].Name == name {
			return j, true
		}
		for _, j := range collided[h] {
			if t.Entries[j].Name == name {
				return j, true
			}
		}
		return 0, false
	}
	for i := range t.Entries {
		name := t.Entries[i].Name
		var h uint64
		for k := 0; k < len(name); k++ {
			if name[k] == '/' {
				if j, ok := lookup(h, name[:k]); ok {
					return invalid("entry %d (%q): lies below entry %d (%q), a %s", i, short(name), j, short(t.Entries[j].Name), t.Entries[j].Type)
				}
			}
			h = hashStep(h, base, name[k])
		}
	}
	return nil
}

// hashPrime is the Mersenne prime 2^61-1.
const hashPrime = 1<<61 - 1

// hashStep appends byte c to the polynomial hash h (h*base + c+1 mod
// hashPrime). h and base are below hashPrime.
func hashStep(h, base uint64, c byte) uint64 {
	hi, lo := bits.Mul64(h, base)
	// 2^61 = 1 mod p: fold the high bits onto the low 61.
	r := (hi<<3 | lo>>61) + lo&hashPrime
	if r >= hashPrime {
		r -= hashPrime
	}
	r += uint64(c) + 1
	if r >= hashPrime {
		r -= hashPrime
	}
	return r
}

func (t *TOC) validatePrefetch(byName map[string]int) error {
	seen := make(map[string]struct{}, len(t.Prefetch))
	for i, name := range t.Prefetch {
		j, ok := byName[name]
		if !ok {
			return invalid("prefetch %d (%q): no such entry", i, short(name))
		}
		if typ := t.Entries[j].Type; typ != TypeReg && typ != TypeHardlink {
			return invalid("prefetch %d (%q): a %s, want a regular file or hardlink", i, short(name), typ)
		}
		if _, dup := seen[name]; dup {
			return invalid("prefetch %d (%q): listed twice", i, short(name))
		}
		seen[name] = struct{}{}
	}
	ranged := make(map[string]struct{}, len(t.PrefetchRanges))
	for i, fr := range t.PrefetchRanges {
		if _, ok := seen[fr.Name]; !ok {
			return invalid("prefetch ranges %d (%q): not in the prefetch list", i, short(fr.Name))
		}
		if _, dup := ranged[fr.Name]; dup {
			return invalid("prefetch ranges %d (%q): given twice", i, short(fr.Name))
		}
		ranged[fr.Name] = struct{}{}
		e := t.Entries[byName[fr.Name]]
		if e.Type == TypeHardlink {
			if k, ok := byName[e.Linkname]; ok {
				e = t.Entries[k]
			}
		}
		if len(fr.Ranges) == 0 {
			return invalid("prefetch ranges %d (%q): no range", i, short(fr.Name))
		}
		var end int64
		for k, r := range fr.Ranges {
			switch {
			case r.Offset < end || r.Size <= 0:
				return invalid("prefetch ranges %d (%q): range %d [%d, +%d) empty, out of order or overlapping", i, short(fr.Name), k, r.Offset, r.Size)
			case r.Size > e.Size || r.Offset > e.Size-r.Size:
				return invalid("prefetch ranges %d (%q): range %d [%d, +%d) beyond the file's %d bytes", i, short(fr.Name), k, r.Offset, r.Size, e.Size)
			}
			end = r.End()
		}
	}
	return nil
}

// PrefetchRangeMap maps each prefetch name that has ranges to them; a
// listed file not in it is to be prefetched whole.
func (t *TOC) PrefetchRangeMap() map[string][]Range {
	m := make(map[string][]Range, len(t.PrefetchRanges))
	for _, fr := range t.PrefetchRanges {
		m[fr.Name] = fr.Ranges
	}
	return m
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
