// Package converter turns container images into Streamer streaming
// artifacts: each layer tar becomes a streaming blob of independent zstd
// frames plus a table of contents, pushed as an OCI referrer of the image.
package converter

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"path"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
)

// ErrBadTar is returned when a layer is not a well-formed tar archive, or
// holds something a streaming layer cannot describe.
var ErrBadTar = errors.New("malformed layer tar")

// LayerOptions tune ConvertLayer. The zero value uses the defaults.
type LayerOptions struct {
	// ChunkSize is the maximum uncompressed chunk size; 0 means
	// artifact.DefaultChunkSize. It must lie within
	// [artifact.MinChunkSize, artifact.MaxChunkSize].
	ChunkSize int64
	// Level is the zstd compression level (1..22 as in the zstd CLI);
	// 0 means the encoder's default.
	Level int
	// Concurrency is the number of chunks compressed in parallel;
	// 0 means GOMAXPROCS.
	Concurrency int
}

// LayerResult is what ConvertLayer made of one layer.
type LayerResult struct {
	// TOC describes the layer; its Layer field is left for the caller.
	TOC *artifact.TOC
	// Blob describes the streaming blob written (media type
	// artifact.MediaTypeStreamingLayer).
	Blob ocispec.Descriptor
	// DiffID is the sha256 of the uncompressed input tar.
	DiffID digest.Digest
}

func (o LayerOptions) withDefaults() (LayerOptions, error) {
	if o.ChunkSize == 0 {
		o.ChunkSize = artifact.DefaultChunkSize
	}
	if o.ChunkSize < artifact.MinChunkSize || o.ChunkSize > artifact.MaxChunkSize {
		return o, fmt.Errorf("chunk size %d outside [%d, %d]", o.ChunkSize, artifact.MinChunkSize, artifact.MaxChunkSize)
	}
	if o.Level < 0 || o.Level > 22 {
		return o, fmt.Errorf("zstd level %d outside [0, 22]", o.Level)
	}
	if o.Concurrency <= 0 {
		o.Concurrency = runtime.GOMAXPROCS(0)
	}
	return o, nil
}

// ConvertLayer reads an uncompressed layer tar once from tarStream and
// writes its streaming blob to blob: one independent zstd frame per chunk,
// compressed in parallel and written in order, whose concatenated
// decompression is byte for byte the input. Chunk boundaries lie at the
// first and after the last data byte of every non-empty regular file and
// wherever the current chunk reaches opts.ChunkSize, so a file's data is
// covered by chunks holding nothing else and identical files in different
// layers share chunk digests; the headers and padding between files form
// the chunks between them. Memory stays bounded by a few chunks per worker whatever the
// layer's size.
//
// The returned TOC is complete and valid except for its Layer field, which
// the caller sets. A malformed tar yields an error wrapping ErrBadTar.
func ConvertLayer(ctx context.Context, tarStream io.Reader, blob io.Writer, opts LayerOptions) (*LayerResult, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("convert layer: %w", err)
	}
	p, err := newPipeline(blob, opts)
	if err != nil {
		return nil, fmt.Errorf("convert layer: %w", err)
	}
	rec := &recorder{
		ctx:  ctx,
		r:    bufio.NewReaderSize(tarStream, 256<<10),
		diff: sha256.New(),
		p:    p,
		cur:  p.getBuf(),
	}
	toc, err := readTar(rec, opts)
	if err == nil {
		err = rec.flush()
	}
	chunks, blobDesc, perr := p.finish(err != nil)
	if err != nil {
		return nil, fmt.Errorf("convert layer: %w", err)
	}
	if perr != nil {
		return nil, fmt.Errorf("convert layer: %w", perr)
	}
	toc.Chunks = chunks
	toc.DiffID = digest.NewDigest(digest.SHA256, rec.diff)
	toc.TarSize = rec.off
	toc.BlobSize = blobDesc.Size
	// Validate as a consumer will; Layer is the caller's, so stand in for it.
	toc.Layer = toc.DiffID
	err = toc.Validate(artifact.Limits{})
	toc.Layer = ""
	if err != nil {
		return nil, fmt.Errorf("convert layer: %w: %w", ErrBadTar, err)
	}
	return &LayerResult{TOC: toc, Blob: blobDesc, DiffID: toc.DiffID}, nil
}

// readTar parses the tar through rec, cutting a chunk at the start and end
// of every regular file's data, and returns the TOC entries. It drains rec to the
// end so that trailing bytes after the end-of-archive marker are kept.
func readTar(rec *recorder, opts LayerOptions) (*artifact.TOC, error) {
	toc := &artifact.TOC{Version: artifact.TOCVersion, ChunkSize: opts.ChunkSize}
	tr := tar.NewReader(rec)
	buf := make([]byte, 256<<10)
	entries := entryList{byName: map[string]int{}, list: []artifact.Entry{}}
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			if rec.err != nil {
				return nil, rec.err
			}
			return nil, fmt.Errorf("%w: read header after offset %d: %v", ErrBadTar, rec.off, err)
		}
		e, keep, err := entryOf(hdr)
		if err != nil {
			return nil, fmt.Errorf("%w: entry %q at offset %d: %v", ErrBadTar, hdr.Name, rec.off, err)
		}
		if !keep {
			continue
		}
		if e.Name == "." && e.Type != artifact.TypeDir {
			return nil, fmt.Errorf("%w: entry %q at offset %d: the layer root is a %s, not a directory", ErrBadTar, hdr.Name, rec.off, e.Type)
		}
		if e.Type == artifact.TypeReg {
			e.Offset = rec.off
			if e.Size > 0 {
				// File data starts a chunk, so identical files share chunks.
				if err := rec.cut(); err != nil {
					return nil, err
				}
				n, err := io.CopyBuffer(discard{}, tr, buf)
				if err != nil {
					if rec.err != nil {
						return nil, rec.err
					}
					return nil, fmt.Errorf("%w: data of %q at offset %d: %v", ErrBadTar, e.Name, e.Offset, err)
				}
				if n != e.Size {
					return nil, fmt.Errorf("%w: data of %q: read %d bytes, header says %d", ErrBadTar, e.Name, n, e.Size)
				}
				// And ends one: the padding and headers that follow would
				// otherwise make the file's last chunk differ between layers.
				if err := rec.cut(); err != nil {
					return nil, err
				}
			}
		}
		entries.add(e)
	}
	toc.Entries = entries.list
	// Bytes after the end-of-archive marker (record padding) are part of
	// the layer and of its DiffID.
	if _, err := io.CopyBuffer(discard{}, rec, buf); err != nil {
		return nil, err
	}
	if rec.err != nil {
		return nil, rec.err
	}
	return toc, nil
}

// entryList collects TOC entries with tar's extraction semantics for
// repeated names: a later entry replaces an earlier one. The layer root
// ("./") is not an entry: a mount point has its own attributes.
type entryList struct {
	byName map[string]int
	list   []artifact.Entry
}

func (l *entryList) add(e artifact.Entry) {
	if e.Name == "." {
		return
	}
	i, dup := l.byName[e.Name]
	switch {
	case !dup:
	case e.Type == artifact.TypeDir && l.list[i].Type == artifact.TypeDir:
		// Re-stating a directory updates its metadata where it stands.
		l.list[i] = e
		return
	default:
		l.list = append(l.list[:i], l.list[i+1:]...)
		for name, j := range l.byName {
			if j > i {
				l.byName[name] = j - 1
			}
		}
	}
	l.byName[e.Name] = len(l.list)
	l.list = append(l.list, e)
}

// discard is io.Discard without ReadFrom, so io.CopyBuffer uses our buffer.
type discard struct{}

func (discard) Write(b []byte) (int, error) { return len(b), nil }

// xattrPrefix marks extended attributes among PAX records.
const xattrPrefix = "SCHILY.xattr."

// entryOf maps a tar header to a TOC entry. keep is false for headers that
// describe no file (global PAX headers).
func entryOf(h *tar.Header) (e artifact.Entry, keep bool, err error) {
	for k := range h.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return e, false, errors.New("sparse files are not supported")
		}
	}
	switch h.Typeflag {
	case tar.TypeReg, '\x00', tar.TypeCont:
		e.Type = artifact.TypeReg
		e.Size = h.Size
	case tar.TypeDir:
		e.Type = artifact.TypeDir
	case tar.TypeSymlink:
		e.Type = artifact.TypeSymlink
		if h.Linkname == "" {
			return e, false, errors.New("symlink without target")
		}
		e.Linkname = h.Linkname
	case tar.TypeLink:
		e.Type = artifact.TypeHardlink
		if e.Linkname, err = cleanName(h.Linkname); err != nil {
			return e, false, fmt.Errorf("hardlink target: %w", err)
		}
	case tar.TypeChar, tar.TypeBlock:
		e.Type = artifact.TypeChar
		if h.Typeflag == tar.TypeBlock {
			e.Type = artifact.TypeBlock
		}
		e.Devmajor, e.Devminor = h.Devmajor, h.Devminor
	case tar.TypeFifo:
		e.Type = artifact.TypeFifo
	case tar.TypeXGlobalHeader:
		return e, false, nil
	case tar.TypeGNUSparse:
		return e, false, errors.New("sparse files are not supported")
	default:
		return e, false, fmt.Errorf("unsupported entry type %q", h.Typeflag)
	}
	if h.Typeflag != tar.TypeReg && h.Typeflag != '\x00' && h.Typeflag != tar.TypeCont && h.Size != 0 {
		return e, false, fmt.Errorf("%s entry with %d data bytes", e.Type, h.Size)
	}
	if e.Name, err = cleanName(h.Name); err != nil {
		return e, false, err
	}
	e.Mode = h.Mode & 0o7777
	e.UID, e.GID = h.Uid, h.Gid
	e.Uname, e.Gname = h.Uname, h.Gname
	e.ModTime = h.ModTime.UTC()
	for k, v := range h.PAXRecords {
		if name, ok := strings.CutPrefix(k, xattrPrefix); ok {
			if e.Xattrs == nil {
				e.Xattrs = make(map[string][]byte)
			}
			e.Xattrs[name] = []byte(v)
		}
	}
	return e, true, nil
}

// cleanName turns a tar name into the TOC's clean relative form
// ("./a/b/" -> "a/b", "./" -> "."). Names that climb out of the root are
// refused rather than silently rewritten.
func cleanName(name string) (string, error) {
	if name == "" {
		return "", errors.New("empty name")
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", fmt.Errorf("name %q contains \"..\"", name)
		}
	}
	c := path.Clean("/" + name)[1:]
	if c == "" {
		c = "."
	}
	return c, nil
}

// recorder sits under archive/tar: every byte the tar reader consumes is
// hashed into the DiffID and appended to the current chunk, so the chunks
// hold exactly the input bytes whatever the tar reader does with them.
type recorder struct {
	ctx    context.Context
	r      io.Reader
	diff   hash.Hash
	p      *pipeline
	off    int64  // bytes consumed so far
	cur    []byte // current chunk, len < chunk size
	curOff int64  // offset of cur in the tar
	err    error  // first non-tar error: source read, cancellation, blob write
}

func (rc *recorder) Read(b []byte) (int, error) {
	if rc.err != nil {
		return 0, rc.err
	}
	if err := rc.ctx.Err(); err != nil {
		rc.err = err
		return 0, err
	}
	n, err := rc.r.Read(b)
	if n > 0 {
		rc.diff.Write(b[:n])
		rc.off += int64(n)
		if rerr := rc.record(b[:n]); rerr != nil {
			rc.err = rerr
			return n, rerr
		}
	}
	if err != nil && err != io.EOF {
		rc.err = fmt.Errorf("read layer at offset %d: %w", rc.off, err)
		return n, rc.err
	}
	return n, err
}

func (rc *recorder) record(b []byte) error {
	for len(b) > 0 {
		room := cap(rc.cur) - len(rc.cur)
		k := min(room, len(b))
		rc.cur = append(rc.cur, b[:k]...)
		b = b[k:]
		if len(rc.cur) == cap(rc.cur) {
			if err := rc.cut(); err != nil {
				return err
			}
		}
	}
	return nil
}

// cut ends the current chunk (if it holds anything) and hands it to the
// compressors.
func (rc *recorder) cut() error {
	if len(rc.cur) == 0 {
		return nil
	}
	if err := rc.p.submit(rc.ctx, rc.cur, rc.curOff); err != nil {
		rc.err = err
		return err
	}
	rc.curOff += int64(len(rc.cur))
	rc.cur = rc.p.getBuf()
	return nil
}

func (rc *recorder) flush() error {
	if err := rc.cut(); err != nil {
		return err
	}
	rc.p.putBuf(rc.cur)
	rc.cur = nil
	return nil
}

// job is one chunk on its way through the pipeline.
type job struct {
	raw  []byte
	off  int64
	out  []byte
	dgst digest.Digest
	done chan struct{}
}

// pipeline compresses chunks on Concurrency workers and writes their
// frames in input order. At most 2*Concurrency+1 chunks are in flight.
type pipeline struct {
	w         io.Writer
	blobHash  hash.Hash
	chunkSize int64
	work      chan *job
	order     chan *job
	bufs      sync.Pool // uncompressed chunk buffers
	outs      sync.Pool // compressed frame buffers
	aborted   atomic.Bool
	failed    atomic.Pointer[error]
	workers   sync.WaitGroup
	writer    chan struct{}

	chunks   []artifact.Chunk
	blobSize int64
}

func newPipeline(w io.Writer, opts LayerOptions) (*pipeline, error) {
	level := zstd.SpeedDefault
	if opts.Level > 0 {
		level = zstd.EncoderLevelFromZstd(opts.Level)
	}
	inFlight := 2*opts.Concurrency + 1
	p := &pipeline{
		w:         w,
		blobHash:  sha256.New(),
		chunkSize: opts.ChunkSize,
		work:      make(chan *job, inFlight+opts.Concurrency),
		order:     make(chan *job, inFlight),
		writer:    make(chan struct{}),
	}
	p.bufs.New = func() any { b := make([]byte, 0, p.chunkSize); return &b }
	encs := make([]*zstd.Encoder, opts.Concurrency)
	for i := range encs {
		// Frames never exceed a chunk, so a larger window would only cost memory.
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(windowFor(opts.ChunkSize)))
		if err != nil {
			return nil, fmt.Errorf("create zstd encoder: %w", err)
		}
		encs[i] = enc
	}
	for _, enc := range encs {
		p.workers.Add(1)
		go p.compress(enc)
	}
	go p.write()
	return p, nil
}

func (p *pipeline) getBuf() []byte { return (*(p.bufs.Get().(*[]byte)))[:0] }

func (p *pipeline) putBuf(b []byte) {
	if int64(cap(b)) == p.chunkSize {
		b = b[:0]
		p.bufs.Put(&b)
	}
}

func (p *pipeline) err() error {
	if e := p.failed.Load(); e != nil {
		return *e
	}
	return nil
}

func (p *pipeline) submit(ctx context.Context, raw []byte, off int64) error {
	if err := p.err(); err != nil {
		return err
	}
	j := &job{raw: raw, off: off, done: make(chan struct{})}
	select {
	case p.order <- j:
	case <-ctx.Done():
		p.putBuf(raw)
		return ctx.Err()
	}
	p.work <- j // never blocks: work has room for every job in order plus one per worker
	return nil
}

func (p *pipeline) compress(enc *zstd.Encoder) {
	defer p.workers.Done()
	defer enc.Close()
	for j := range p.work {
		if !p.aborted.Load() {
			j.dgst = digest.FromBytes(j.raw)
			j.out = enc.EncodeAll(j.raw, p.getOut())
		}
		close(j.done)
	}
}

func (p *pipeline) write() {
	defer close(p.writer)
	mw := io.MultiWriter(p.w, p.blobHash)
	for j := range p.order {
		<-j.done
		if !p.aborted.Load() && p.err() == nil {
			if _, err := mw.Write(j.out); err != nil {
				err = fmt.Errorf("write streaming blob at offset %d: %w", p.blobSize, err)
				p.failed.Store(&err)
			} else {
				p.chunks = append(p.chunks, artifact.Chunk{
					Offset:           j.off,
					Size:             int64(len(j.raw)),
					CompressedOffset: p.blobSize,
					CompressedSize:   int64(len(j.out)),
					Digest:           j.dgst,
				})
				p.blobSize += int64(len(j.out))
			}
		}
		p.putBuf(j.raw)
		if j.out != nil {
			p.outs.Put(&j.out)
		}
	}
}

// windowFor returns the smallest zstd window (a power of two, at least
// zstd.MinWindowSize) that holds a whole chunk.
func windowFor(chunkSize int64) int {
	w := zstd.MinWindowSize
	for int64(w) < chunkSize && w < zstd.MaxWindowSize {
		w <<= 1
	}
	return w
}

func (p *pipeline) getOut() []byte {
	if b, ok := p.outs.Get().(*[]byte); ok {
		return (*b)[:0]
	}
	return make([]byte, 0, p.chunkSize/2)
}

// finish stops the pipeline after the last submitted chunk and returns the
// chunk table and the blob's descriptor. With abort, queued chunks are
// dropped instead of written.
func (p *pipeline) finish(abort bool) ([]artifact.Chunk, ocispec.Descriptor, error) {
	if abort {
		p.aborted.Store(true)
	}
	close(p.order)
	close(p.work)
	p.workers.Wait()
	<-p.writer
	if err := p.err(); err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	chunks := p.chunks
	if chunks == nil {
		chunks = []artifact.Chunk{}
	}
	return chunks, ocispec.Descriptor{
		MediaType: artifact.MediaTypeStreamingLayer,
		Digest:    digest.NewDigest(digest.SHA256, p.blobHash),
		Size:      p.blobSize,
	}, nil
}
