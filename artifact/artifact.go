// Package artifact defines Streamer's streaming artifact: the OCI manifest
// that refers to an image, its per-layer streaming blobs and tables of
// contents (TOC), and how they are encoded, decoded and validated.
package artifact

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
)

// Media and artifact types. See docs/format.md.
const (
	// ArtifactType marks a streaming artifact manifest among an image's referrers.
	ArtifactType = "application/vnd.streamer.artifact.v1"
	// MediaTypeStreamingLayer is the streaming blob: independent zstd frames
	// whose concatenation decompresses to the original layer tar.
	MediaTypeStreamingLayer = "application/vnd.oci.image.layer.v1.tar+zstd"
	// MediaTypeTOC is a layer's table of contents: zstd-compressed JSON.
	MediaTypeTOC = "application/vnd.streamer.toc.v1+json+zstd"
	// MediaTypeConfig is the artifact manifest's config blob (OCI empty JSON).
	MediaTypeConfig = "application/vnd.oci.empty.v1+json"

	// AnnotationLayer, on a streaming blob or TOC descriptor, names the
	// original layer digest it was made from.
	AnnotationLayer = "dev.streamer.layer.digest"
	// AnnotationDiffID names the uncompressed digest of the original layer.
	AnnotationDiffID = "dev.streamer.layer.diffid"
	// AnnotationTOC, on a streaming blob descriptor, names its TOC digest.
	AnnotationTOC = "dev.streamer.toc.digest"
	// AnnotationCreated is the artifact's creation time (RFC 3339); when
	// several artifacts refer to one image, the newest wins.
	AnnotationCreated = "org.opencontainers.image.created"
	// AnnotationVersion is the format version of the artifact.
	AnnotationVersion = "dev.streamer.format.version"

	// TOCVersion is the TOC schema version this package writes and reads.
	TOCVersion = 1

	// DefaultChunkSize is the default maximum uncompressed chunk size
	// (see docs/format.md for the measurement behind it).
	DefaultChunkSize = 1 << 20
	// MinChunkSize and MaxChunkSize bound the configurable chunk size.
	MinChunkSize = 64 << 10
	MaxChunkSize = 64 << 20
)

// Sentinel errors callers branch on.
var (
	// ErrDigestMismatch: bytes do not match the digest that vouches for them.
	ErrDigestMismatch = errors.New("digest mismatch")
	// ErrInvalidTOC: a TOC failed validation.
	ErrInvalidTOC = errors.New("invalid TOC")
	// ErrInvalidManifest: a manifest is not a valid streaming artifact.
	ErrInvalidManifest = errors.New("invalid streaming artifact manifest")
)

// EntryType is the kind of a tar entry.
type EntryType string

// Entry types.
const (
	TypeReg      EntryType = "reg"
	TypeDir      EntryType = "dir"
	TypeSymlink  EntryType = "symlink"
	TypeHardlink EntryType = "hardlink"
	TypeChar     EntryType = "char"
	TypeBlock    EntryType = "block"
	TypeFifo     EntryType = "fifo"
)

// Entry is one tar entry of a layer. Name is clean and relative ("usr/bin/sh",
// never "./" or "/" prefixed); whiteouts keep their tar names (".wh.x",
// ".wh..wh..opq") so that consumers map them as overlayfs expects.
type Entry struct {
	Name     string    `json:"name"`
	Type     EntryType `json:"type"`
	Mode     int64     `json:"mode"` // permission, setuid/setgid/sticky bits
	UID      int       `json:"uid"`
	GID      int       `json:"gid"`
	Uname    string    `json:"uname,omitempty"`
	Gname    string    `json:"gname,omitempty"`
	ModTime  time.Time `json:"mtime"`
	Size     int64     `json:"size,omitempty"`     // regular files: data size
	Linkname string    `json:"linkname,omitempty"` // symlink target, hardlink target name
	Devmajor int64     `json:"devmajor,omitempty"`
	Devminor int64     `json:"devminor,omitempty"`
	// Xattrs holds extended attributes (from SCHILY.xattr.* PAX records).
	Xattrs map[string][]byte `json:"xattrs,omitempty"`
	// Offset is where the file's data starts in the uncompressed tar.
	Offset int64 `json:"offset,omitempty"`
}

// Chunk is one independently compressed zstd frame of a streaming blob.
type Chunk struct {
	// Offset and Size locate the chunk in the uncompressed tar.
	Offset int64 `json:"offset"`
	Size   int64 `json:"size"`
	// CompressedOffset and CompressedSize locate its frame in the blob.
	CompressedOffset int64 `json:"coffset"`
	CompressedSize   int64 `json:"csize"`
	// Digest is the sha256 of the chunk's uncompressed bytes.
	Digest digest.Digest `json:"digest"`
}

// TOC is the table of contents of one streaming layer.
type TOC struct {
	Version int `json:"version"`
	// Layer is the original layer's digest; DiffID its uncompressed digest.
	Layer  digest.Digest `json:"layer"`
	DiffID digest.Digest `json:"diffID"`
	// TarSize is the size of the uncompressed tar; BlobSize of the streaming blob.
	TarSize  int64 `json:"tarSize"`
	BlobSize int64 `json:"blobSize"`
	// ChunkSize is the maximum uncompressed chunk size used.
	ChunkSize int64   `json:"chunkSize"`
	Entries   []Entry `json:"entries"`
	Chunks    []Chunk `json:"chunks"`
	// Prefetch lists entry names read at startup, in order.
	Prefetch []string `json:"prefetch,omitempty"`
	// PrefetchRanges narrows listed files to the byte ranges a startup
	// read of them; a listed file without ranges is prefetched whole.
	PrefetchRanges []FileRanges `json:"prefetchRanges,omitempty"`
}

// FileRanges names the byte ranges of one listed file its startup read,
// in file offsets, sorted and disjoint.
type FileRanges struct {
	Name   string  `json:"name"`
	Ranges []Range `json:"ranges"`
}

// Range is Size bytes of a file from Offset; in JSON [offset, size].
type Range struct {
	Offset, Size int64
}

// End is the offset just past r.
func (r Range) End() int64 { return r.Offset + r.Size }

// MergeRanges sorts rs by offset and merges the ranges that overlap or
// touch, in place; the result is sorted and disjoint, as a TOC's
// prefetch ranges must be.
func MergeRanges(rs []Range) []Range {
	slices.SortFunc(rs, func(a, b Range) int { return cmp.Compare(a.Offset, b.Offset) })
	out := rs[:0]
	for _, r := range rs {
		if n := len(out); n > 0 && r.Offset <= out[n-1].End() {
			out[n-1].Size = max(out[n-1].End(), r.End()) - out[n-1].Offset
			continue
		}
		out = append(out, r)
	}
	return out
}

// MarshalJSON writes r as [offset, size].
func (r Range) MarshalJSON() ([]byte, error) {
	return []byte(fmt.Sprintf("[%d,%d]", r.Offset, r.Size)), nil
}

// UnmarshalJSON reads [offset, size], exactly two integers.
func (r *Range) UnmarshalJSON(b []byte) error {
	var v []int64
	if err := json.Unmarshal(b, &v); err != nil {
		return fmt.Errorf("range: %w", err)
	}
	if len(v) != 2 {
		return fmt.Errorf("range: %d numbers, want [offset, size]", len(v))
	}
	r.Offset, r.Size = v[0], v[1]
	return nil
}

// Layer pairs an original image layer with its streaming blob and TOC as
// named by an artifact manifest.
type Layer struct {
	Original digest.Digest // original (image) layer digest
	DiffID   digest.Digest
	Blob     Descriptor // streaming blob
	TOC      Descriptor // TOC blob
}

// Descriptor is the part of an OCI descriptor this package needs.
type Descriptor struct {
	MediaType string
	Digest    digest.Digest
	Size      int64
}
