package converter

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
)

// ErrCorruptLayer is returned when a layer's compressed stream cannot be
// decompressed, or its content does not match the image config's diffID.
var ErrCorruptLayer = errors.New("corrupt layer")

// Layer media types Convert accepts. Others (foreign, non-distributable,
// encrypted layers) give ErrUnsupportedMediaType.
var supportedLayerTypes = map[string]bool{
	ocispec.MediaTypeImageLayer:     true,
	ocispec.MediaTypeImageLayerGzip: true,
	ocispec.MediaTypeImageLayerZstd: true,
	mediaTypeDockerLayer:            true,
	mediaTypeDockerLayerGzip:        true,
	mediaTypeDockerLayerZstd:        true,
}

const (
	mediaTypeDockerLayer     = "application/vnd.docker.image.rootfs.diff.tar"
	mediaTypeDockerLayerGzip = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	mediaTypeDockerLayerZstd = "application/vnd.docker.image.rootfs.diff.tar.zstd"
)

// LayerEvent tells a Progress callback which layer it is about.
type LayerEvent struct {
	Platform string
	// Index is the layer's position in the image (0 first), of Count.
	Index, Count int
	// Layer is the original layer's digest, Size its compressed size.
	Layer digest.Digest
	Size  int64
	// Bytes is how much of the original layer has been read so far.
	Bytes int64
}

// Progress receives per-layer events. Every field is optional. Callbacks
// run on the converting goroutine, one at a time.
type Progress struct {
	// Start is called when a layer's conversion starts.
	Start func(LayerEvent)
	// Bytes is called as the original layer is read (at most every 64 KiB).
	Bytes func(LayerEvent)
	// Done is called when a layer's streaming blob and TOC are pushed.
	Done func(LayerEvent, LayerReport)
	// Reused is called when an earlier conversion of the layer is reused.
	Reused func(LayerEvent, LayerReport)
}

// Options tune Convert. The zero value converts every platform with the
// default layer options.
type Options struct {
	// Platform selects one platform ("linux/amd64") of an index; "" means all.
	Platform string
	// Layer tunes each layer's conversion.
	Layer LayerOptions
	// Progress receives per-layer events.
	Progress Progress
	// Created returns the artifact's creation time; default time.Now.
	Created func() time.Time
	// CacheDir holds the layer index (layers.json) that lets conversions
	// reuse streaming blobs already in the registry; default
	// $XDG_CACHE_HOME/streamer (os.UserCacheDir). "-" disables the index.
	CacheDir string
	// TempDir holds converted blobs until they are pushed; default os.TempDir().
	TempDir string
	// PrefetchList, when not nil, is the artifact's startup profile: paths
	// of the image's merged filesystem (absolute or relative), in order of
	// first read, each with the byte ranges of it read at startup when
	// not the whole file. Each layer's TOC lists the regular files it
	// provides as the top-most layer holding them. An existing artifact
	// whose lists differ is replaced by a new revision (new TOCs, the same
	// streaming blobs). Nil leaves prefetch lists as they are.
	PrefetchList []PrefetchFile
	// PrefetchIgnoreMissing ignores paths of PrefetchList the image does
	// not have, instead of failing with ErrPrefetchMissing, and cuts
	// ranges past the end of their files instead of failing with
	// ErrPrefetchBeyond.
	PrefetchIgnoreMissing bool
}

// LayerReport describes one layer of a streaming artifact.
type LayerReport struct {
	// Original is the image layer's digest, MediaType its media type
	// (empty when the artifact already existed).
	Original  digest.Digest
	MediaType string
	DiffID    digest.Digest
	// Blob and TOC are the streaming blob and TOC descriptors.
	Blob ocispec.Descriptor
	TOC  ocispec.Descriptor
	// Reused is true when the blob and TOC came from an earlier conversion.
	Reused bool
	// TarSize, Entries and Chunks describe a layer converted in this run
	// (zero when reused).
	TarSize int64
	Entries int
	Chunks  int
	// Prefetch is the number of files the layer's prefetch list names
	// (set when Options.PrefetchList is).
	Prefetch int
}

// Result is the outcome of converting one platform's image manifest.
type Result struct {
	// Platform is "os/arch[/variant]", empty when unknown.
	Platform string
	// Subject is the image manifest; Artifact the streaming artifact
	// manifest that refers to it.
	Subject  ocispec.Descriptor
	Artifact ocispec.Descriptor
	// Existing is true when a valid artifact was already there: nothing
	// was pushed.
	Existing bool
	Layers   []LayerReport
	// Replaced is the earlier artifact revision a new one (with other
	// prefetch lists) replaced; ReplacedRemains says it could not be
	// deleted (the registry refuses deletes): it stays, superseded.
	Replaced        ocispec.Descriptor
	ReplacedRemains bool
}

// Convert makes a streaming artifact for every image manifest ref names
// (every platform of an index, or only opts.Platform) and pushes it into
// ref's repository as a referrer of the image manifest. It is idempotent:
// an image that already has a valid artifact is reported, not converted
// again. Layers converted before (recorded in the local layer index and
// still in the registry) are reused, mounted across repositories when
// needed. The artifact manifest is pushed only once every blob it names is
// in the registry.
func Convert(ctx context.Context, c *fetcher.Client, ref fetcher.Ref, opts Options) ([]Result, error) {
	if opts.Created == nil {
		opts.Created = time.Now
	}
	if _, err := opts.Layer.withDefaults(); err != nil {
		return nil, fmt.Errorf("convert %s: %w", ref, err)
	}
	ims, err := c.ImageManifests(ctx, ref, opts.Platform)
	if err != nil {
		return nil, fmt.Errorf("convert %s: %w", ref, err)
	}
	idx := openIndex(ctx, opts.CacheDir)
	cv := &converter{c: c, ref: ref, opts: opts, idx: idx, done: map[digest.Digest]LayerReport{}, tocs: map[digest.Digest]*artifact.TOC{}}
	var out []Result
	for _, im := range ims {
		res, err := cv.image(ctx, im)
		if err != nil {
			return out, fmt.Errorf("convert %s: %w", ref, err)
		}
		out = append(out, res)
	}
	return out, nil
}

// converter carries one Convert call's state.
type converter struct {
	c    *fetcher.Client
	ref  fetcher.Ref
	opts Options
	idx  *layerIndex
	// done holds the layers converted or reused in this call, so that a
	// layer shared by several platforms is handled once.
	done map[digest.Digest]LayerReport
	// tocs are TOCs made or read in this call, by digest.
	tocs map[digest.Digest]*artifact.TOC
}

func (cv *converter) image(ctx context.Context, im fetcher.ImageManifest) (Result, error) {
	platform := fetcher.PlatformString(im.Platform)
	subject := ocispec.Descriptor{MediaType: im.Descriptor.MediaType, Digest: im.Descriptor.Digest, Size: im.Descriptor.Size}
	res := Result{Platform: platform, Subject: subject}
	l := log.G(ctx).WithFields(log.Fields{"image": cv.ref.String(), "manifest": subject.Digest, "platform": platform})

	existing, desc, err := cv.c.FindArtifact(ctx, cv.ref, subject)
	switch {
	case err == nil && cv.opts.PrefetchList != nil:
		return cv.revise(ctx, res, existing, desc)
	case err == nil:
		l.WithField("artifact", desc.Digest).Info("streaming artifact already exists")
		res.Artifact, res.Existing = desc, true
		for _, ly := range existing.Layers {
			res.Layers = append(res.Layers, LayerReport{Original: ly.Original, DiffID: ly.DiffID, Blob: ociDesc(ly.Blob), TOC: ociDesc(ly.TOC), Reused: true})
		}
		return res, nil
	case !errors.Is(err, fetcher.ErrNoArtifact):
		return res, fmt.Errorf("image %s: %w", subject.Digest, err)
	}

	layers := im.Manifest.Layers
	if len(layers) == 0 {
		return res, fmt.Errorf("image %s has no layers", subject.Digest)
	}
	for i, ly := range layers {
		if !supportedLayerTypes[ly.MediaType] {
			return res, fmt.Errorf("image %s layer %d (%s): %w %q", subject.Digest, i, ly.Digest, ErrUnsupportedMediaType, ly.MediaType)
		}
	}
	diffIDs, err := cv.diffIDs(ctx, im.Manifest.Config)
	if err != nil {
		return res, fmt.Errorf("image %s: %w", subject.Digest, err)
	}
	if len(diffIDs) != len(layers) {
		return res, fmt.Errorf("image %s: config lists %d diff_ids for %d layers: %w", subject.Digest, len(diffIDs), len(layers), ErrCorruptLayer)
	}

	var built []artifact.Layer
	for i, ly := range layers {
		ev := LayerEvent{Platform: platform, Index: i, Count: len(layers), Layer: ly.Digest, Size: ly.Size}
		rep, err := cv.layer(ctx, ev, ly, diffIDs[i])
		if err != nil {
			return res, fmt.Errorf("image %s: layer %d (%s): %w", subject.Digest, i, ly.Digest, err)
		}
		res.Layers = append(res.Layers, rep)
		built = append(built, artifact.Layer{Original: rep.Original, DiffID: rep.DiffID, Blob: artDesc(rep.Blob), TOC: artDesc(rep.TOC)})
	}

	if cv.opts.PrefetchList != nil {
		if built, _, err = cv.withPrefetch(ctx, subject, built, res.Layers); err != nil {
			return res, fmt.Errorf("image %s: %w", subject.Digest, err)
		}
	}
	// Every blob is in the registry: now the manifest may name them.
	adesc, err := cv.pushArtifact(ctx, subject, built, cv.opts.Created())
	if err != nil {
		return res, err
	}
	res.Artifact = adesc
	l.WithFields(log.Fields{"artifact": adesc.Digest, "layers": len(built), "op": "create"}).Info("streaming artifact pushed")
	return res, nil
}

// diffIDs reads the image config's rootfs.diff_ids.
func (cv *converter) diffIDs(ctx context.Context, cfg ocispec.Descriptor) ([]digest.Digest, error) {
	const maxConfig = 8 << 20
	if cfg.Size > maxConfig {
		return nil, fmt.Errorf("image config %s: %d bytes, limit %d", cfg.Digest, cfg.Size, maxConfig)
	}
	rc, err := cv.c.FetchBlob(ctx, cv.ref, cfg)
	if err != nil {
		return nil, fmt.Errorf("fetch image config: %w", err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("read image config %s: %w", cfg.Digest, err)
	}
	var img ocispec.Image
	if err := json.Unmarshal(b, &img); err != nil {
		return nil, fmt.Errorf("decode image config %s: %w: %v", cfg.Digest, ErrCorruptLayer, err)
	}
	return img.RootFS.DiffIDs, nil
}

// layer reuses or converts one layer and leaves its blob and TOC in the
// registry.
func (cv *converter) layer(ctx context.Context, ev LayerEvent, ly ocispec.Descriptor, diffID digest.Digest) (LayerReport, error) {
	if rep, ok := cv.done[ly.Digest]; ok {
		return cv.reused(ev, rep), nil
	}
	if rep, ok := cv.reuse(ctx, ly, diffID); ok {
		cv.done[ly.Digest] = rep
		return cv.reused(ev, rep), nil
	}
	if cv.opts.Progress.Start != nil {
		cv.opts.Progress.Start(ev)
	}
	rep, err := cv.convertLayer(ctx, ev, ly, diffID)
	if err != nil {
		return rep, err
	}
	cv.done[ly.Digest] = rep
	cv.idx.record(ctx, ly.Digest, indexEntry{
		Host: cv.ref.Host, Repository: cv.ref.Repository, DiffID: rep.DiffID,
		ChunkSize: cv.chunkSize(), Level: cv.opts.Layer.Level, Blob: rep.Blob, TOC: rep.TOC,
	})
	if cv.opts.Progress.Done != nil {
		ev.Bytes = ly.Size
		cv.opts.Progress.Done(ev, rep)
	}
	return rep, nil
}

func (cv *converter) reused(ev LayerEvent, rep LayerReport) LayerReport {
	rep.Reused = true
	if cv.opts.Progress.Reused != nil {
		ev.Bytes = ev.Size
		cv.opts.Progress.Reused(ev, rep)
	}
	return rep
}

func (cv *converter) chunkSize() int64 {
	o, _ := cv.opts.Layer.withDefaults()
	return o.ChunkSize
}

// reuse looks the layer up in the local index and makes sure its blob and
// TOC are in the target repository, mounting them from the repository
// they were pushed to when needed.
func (cv *converter) reuse(ctx context.Context, ly ocispec.Descriptor, diffID digest.Digest) (LayerReport, bool) {
	l := log.G(ctx).WithFields(log.Fields{"image": cv.ref.String(), "layer": ly.Digest, "op": "reuse"})
	for _, e := range cv.idx.lookup(ly.Digest, cv.ref.Host, cv.ref.Repository) {
		if e.ChunkSize != cv.chunkSize() || e.Level != cv.opts.Layer.Level || e.DiffID != diffID {
			continue
		}
		ok := true
		for _, d := range []ocispec.Descriptor{e.Blob, e.TOC} {
			if err := cv.present(ctx, d, e); err != nil {
				l.WithError(err).WithField("blob", d.Digest).Debug("earlier conversion not reusable")
				ok = false
				break
			}
		}
		if ok {
			l.WithFields(log.Fields{"from": e.Host + "/" + e.Repository, "blob": e.Blob.Digest}).Info("layer reused from an earlier conversion")
			return LayerReport{Original: ly.Digest, MediaType: ly.MediaType, DiffID: e.DiffID, Blob: e.Blob, TOC: e.TOC}, true
		}
	}
	return LayerReport{}, false
}

// present makes sure blob d is in the target repository: already there, or
// mounted from the repository of index entry e.
func (cv *converter) present(ctx context.Context, d ocispec.Descriptor, e indexEntry) error {
	ok, err := cv.c.BlobExists(ctx, cv.ref, d)
	if err != nil {
		return err
	}
	if ok {
		return nil
	}
	if e.Host != cv.ref.Host || e.Repository == cv.ref.Repository {
		return fmt.Errorf("blob %s gone from %s", d.Digest, cv.ref.Name())
	}
	from := fetcher.Ref{Host: e.Host, Repository: e.Repository}
	return cv.c.MountBlob(ctx, cv.ref, from, d)
}

// ensureBlob pushes d unless the repository already has it.
func (cv *converter) ensureBlob(ctx context.Context, d ocispec.Descriptor, open func() (io.Reader, error)) error {
	ok, err := cv.c.BlobExists(ctx, cv.ref, d)
	if err != nil {
		return err
	}
	if ok {
		return nil
	}
	r, err := open()
	if err != nil {
		return err
	}
	return cv.c.PushBlob(ctx, cv.ref, d, r)
}

// convertLayer fetches, converts and pushes one layer. The streaming blob
// goes through a temporary file, never memory; the file is removed.
func (cv *converter) convertLayer(ctx context.Context, ev LayerEvent, ly ocispec.Descriptor, diffID digest.Digest) (LayerReport, error) {
	l := log.G(ctx).WithFields(log.Fields{"image": cv.ref.String(), "layer": ly.Digest, "op": "convert"})
	start := time.Now()
	tmp, err := os.CreateTemp(cv.opts.TempDir, "streamer-layer-*")
	if err != nil {
		return LayerReport{}, fmt.Errorf("create temporary blob: %w", err)
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()

	res, err := cv.transcode(ctx, ev, ly, tmp)
	if err != nil {
		return LayerReport{}, err
	}
	if res.DiffID != diffID {
		return LayerReport{}, fmt.Errorf("%w: uncompressed digest %s, image config says %s", ErrCorruptLayer, res.DiffID, diffID)
	}

	toc := res.TOC
	toc.Layer = ly.Digest
	tocBytes, tocDigest, err := toc.Marshal()
	if err != nil {
		return LayerReport{}, err
	}
	tocDesc := ocispec.Descriptor{MediaType: artifact.MediaTypeTOC, Digest: tocDigest, Size: int64(len(tocBytes))}
	cv.tocs[tocDigest] = toc
	if err := cv.ensureBlob(ctx, res.Blob, func() (io.Reader, error) {
		_, err := tmp.Seek(0, io.SeekStart)
		return tmp, err
	}); err != nil {
		return LayerReport{}, fmt.Errorf("push streaming blob: %w", err)
	}
	if err := cv.ensureBlob(ctx, tocDesc, func() (io.Reader, error) { return bytes.NewReader(tocBytes), nil }); err != nil {
		return LayerReport{}, fmt.Errorf("push TOC: %w", err)
	}
	l.WithFields(log.Fields{
		"blob": res.Blob.Digest, "toc": tocDigest, "tarSize": toc.TarSize, "blobSize": toc.BlobSize,
		"chunks": len(toc.Chunks), "entries": len(toc.Entries), "elapsed": time.Since(start).Round(time.Millisecond),
	}).Info("layer converted")
	return LayerReport{
		Original: ly.Digest, MediaType: ly.MediaType, DiffID: res.DiffID, Blob: res.Blob, TOC: tocDesc,
		TarSize: toc.TarSize, Entries: len(toc.Entries), Chunks: len(toc.Chunks),
	}, nil
}

// transcode streams the original layer from the registry through the
// decompressor into ConvertLayer, writing the streaming blob to w. The
// original is read to its end, so its digest is always checked; a digest
// mismatch wins over the decompression or tar error it caused.
func (cv *converter) transcode(ctx context.Context, ev LayerEvent, ly ocispec.Descriptor, w io.Writer) (*LayerResult, error) {
	rc, err := cv.c.FetchBlob(ctx, cv.ref, ly)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	raw := &progressReader{r: rc, ev: ev, fn: cv.opts.Progress.Bytes}
	res, err := cv.decodeAndConvert(ctx, raw, ly, w)
	if err != nil && !errors.Is(err, ErrBadTar) && !errors.Is(err, ErrCorruptLayer) {
		return nil, err
	}
	// Drain whatever the decompressor left, so the fetcher checks the digest.
	if _, derr := io.Copy(io.Discard, raw); derr != nil && (err == nil || errors.Is(derr, artifact.ErrDigestMismatch)) {
		return nil, fmt.Errorf("read layer: %w", derr)
	}
	if err != nil {
		return nil, err
	}
	return res, nil
}

func (cv *converter) decodeAndConvert(ctx context.Context, raw *progressReader, ly ocispec.Descriptor, w io.Writer) (*LayerResult, error) {
	dr, kind, err := Decompress(raw)
	if err != nil {
		if raw.err != nil {
			return nil, raw.err
		}
		if errors.Is(err, ErrUnsupportedMediaType) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", ErrCorruptLayer, err)
	}
	defer dr.Close()
	if want := kindOf(ly.MediaType); want != kind {
		log.G(ctx).WithFields(log.Fields{"image": cv.ref.String(), "layer": ly.Digest, "mediaType": ly.MediaType, "found": kind}).Warn("layer compression differs from its media type; using what was found")
	}
	return ConvertLayer(ctx, &decodeErrReader{r: dr, raw: raw, kind: kind}, w, cv.opts.Layer)
}

// kindOf maps a layer media type to the compression Decompress reports.
func kindOf(mediaType string) string {
	switch {
	case strings.HasSuffix(mediaType, "gzip"):
		return KindGzip
	case strings.HasSuffix(mediaType, "zstd"):
		return KindZstd
	}
	return KindTar
}

// progressReader counts the original layer's bytes and reports them.
type progressReader struct {
	r    io.Reader
	ev   LayerEvent
	fn   func(LayerEvent)
	last int64
	err  error // the last non-EOF error of r
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.ev.Bytes += int64(n)
	if p.fn != nil && (p.ev.Bytes-p.last >= 64<<10 || (err == io.EOF && p.ev.Bytes != p.last)) {
		p.last = p.ev.Bytes
		p.fn(p.ev)
	}
	if err != nil && err != io.EOF {
		p.err = err
	}
	return n, err
}

// decodeErrReader marks decompression failures as ErrCorruptLayer while
// passing the original reader's own errors (network, digest) through.
type decodeErrReader struct {
	r    io.Reader
	raw  *progressReader
	kind string
}

func (d *decodeErrReader) Read(b []byte) (int, error) {
	n, err := d.r.Read(b)
	if err != nil && err != io.EOF {
		if d.raw.err != nil {
			return n, d.raw.err
		}
		return n, fmt.Errorf("%w: %s stream: %v", ErrCorruptLayer, d.kind, err)
	}
	return n, err
}

func ociDesc(d artifact.Descriptor) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size}
}

func artDesc(d ocispec.Descriptor) artifact.Descriptor {
	return artifact.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size}
}
