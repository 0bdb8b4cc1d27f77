package converter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
)

// ErrPrefetchMissing is returned when a prefetch list names paths the
// image's merged filesystem does not have (unless
// Options.PrefetchIgnoreMissing).
var ErrPrefetchMissing = errors.New("prefetch list names paths not in the image")

// ErrPrefetchBeyond is returned when a prefetch list gives a file byte
// ranges past its end (unless Options.PrefetchIgnoreMissing): the list was
// recorded with another version of the file.
var ErrPrefetchBeyond = errors.New("prefetch list ranges pass the end of their files")

func equalFileRanges(a, b artifact.FileRanges) bool {
	return a.Name == b.Name && slices.Equal(a.Ranges, b.Ranges)
}

// maxSymlinkHops bounds symlink resolution of a prefetch path, as the
// kernel's MAXSYMLINKS does.
const maxSymlinkHops = 40

// maxTOCBytes bounds a TOC blob read back from the registry.
const maxTOCBytes = 64 << 20

// PrefetchFile is one line of a prefetch list: a path in the image's
// merged filesystem and, when its startup read only parts of it, those
// byte ranges of the file (nil: the whole file is prefetched).
type PrefetchFile struct {
	Path   string
	Ranges []artifact.Range
}

// String formats f as a prefetch list line: the path, then, when there
// are ranges, a tab and OFFSET+SIZE ranges separated by commas.
func (f PrefetchFile) String() string {
	if len(f.Ranges) == 0 {
		return f.Path
	}
	var b strings.Builder
	b.WriteString(f.Path)
	for i, r := range f.Ranges {
		if i == 0 {
			b.WriteByte('\t')
		} else {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(r.Offset, 10) + "+" + strconv.FormatInt(r.Size, 10))
	}
	return b.String()
}

// PrefetchPaths makes a prefetch list of whole files.
func PrefetchPaths(paths ...string) []PrefetchFile {
	out := make([]PrefetchFile, len(paths))
	for i, p := range paths {
		out[i] = PrefetchFile{Path: p}
	}
	return out
}

// ParsePrefetchList reads a prefetch list: one file per line, in order of
// first read: its path, optionally followed by a tab and the byte ranges
// of it read at startup (OFFSET+SIZE, separated by commas; see
// PrefetchFile.String). Blank lines and lines starting with '#' are
// ignored, surrounding spaces trimmed. Ranges are sorted and merged.
func ParsePrefetchList(r io.Reader) ([]PrefetchFile, error) {
	b, err := io.ReadAll(io.LimitReader(r, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("read prefetch list: %w", err)
	}
	out := []PrefetchFile{}
	for n, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := PrefetchFile{Path: line}
		if i := strings.LastIndexByte(line, '\t'); i >= 0 {
			f.Path = strings.TrimSpace(line[:i])
			if f.Ranges, err = parseRanges(line[i+1:]); err != nil {
				return nil, fmt.Errorf("prefetch list line %d (%s): %w", n+1, f.Path, err)
			}
		}
		out = append(out, f)
	}
	return out, nil
}

// parseRanges reads OFFSET+SIZE[,OFFSET+SIZE...] into sorted, merged ranges.
func parseRanges(s string) ([]artifact.Range, error) {
	var rs []artifact.Range
	for _, part := range strings.Split(s, ",") {
		o, sz, ok := strings.Cut(strings.TrimSpace(part), "+")
		off, err1 := strconv.ParseInt(o, 10, 64)
		size, err2 := strconv.ParseInt(sz, 10, 64)
		if !ok || err1 != nil || err2 != nil || off < 0 || size <= 0 || off > math.MaxInt64-size {
			return nil, fmt.Errorf("range %q: want OFFSET+SIZE, a size above 0", part)
		}
		rs = append(rs, artifact.Range{Offset: off, Size: size})
	}
	return artifact.MergeRanges(rs), nil
}

// layerView indexes one layer's TOC by name, as overlayfs sees it.
type layerView struct {
	names    map[string]*artifact.Entry // last entry of a name wins, as in extraction
	whiteout map[string]bool            // paths this layer deletes from lower layers
	opaque   map[string]bool            // directories whose lower content is hidden
}

func newLayerView(toc *artifact.TOC) *layerView {
	v := &layerView{names: map[string]*artifact.Entry{}, whiteout: map[string]bool{}, opaque: map[string]bool{}}
	for i := range toc.Entries {
		e := &toc.Entries[i]
		name := cleanRel(e.Name)
		if name == "" {
			continue
		}
		dir, base := path.Split(name)
		dir = strings.TrimSuffix(dir, "/")
		switch {
		case base == ".wh..wh..opq":
			v.opaque[dir] = true
		case strings.HasPrefix(base, ".wh..wh."):
			// AUFS metadata, not a file.
		case strings.HasPrefix(base, ".wh."):
			v.whiteout[path.Join(dir, base[len(".wh."):])] = true
		default:
			if old, ok := v.names[name]; ok && old.Type == artifact.TypeDir && e.Type == artifact.TypeDir {
				continue
			}
			v.names[name] = e
		}
	}
	return v
}

// hidesBelow reports whether this layer hides p of lower layers: p or one
// of its parents is whited out, a parent is opaque, or a parent is not a
// directory here.
func (v *layerView) hidesBelow(p string) bool {
	if v.whiteout[p] {
		return true
	}
	for a := path.Dir(p); a != "." && a != "/" && a != ""; a = path.Dir(a) {
		if v.whiteout[a] || v.opaque[a] {
			return true
		}
		if e, ok := v.names[a]; ok && e.Type != artifact.TypeDir {
			return true
		}
	}
	return false
}

// merged is the merged filesystem of an image's layers (bottom first).
type merged []*layerView

// entryAt returns the top-most layer that has an entry named p and is not
// hidden by a layer above it; -1 when none.
func (m merged) entryAt(p string) (int, *artifact.Entry) {
	for i := len(m) - 1; i >= 0; i-- {
		if e, ok := m[i].names[p]; ok {
			return i, e
		}
		if m[i].hidesBelow(p) {
			return -1, nil
		}
	}
	return -1, nil
}

// errNotRegular marks a prefetch path that resolves to something other
// than a regular file (a directory, a device): it is skipped.
var errNotRegular = errors.New("not a regular file")

// resolve finds the layer and TOC name holding the data of the regular file
// at p (clean, relative), following symlinks (in any component) and
// hardlinks. It returns -1 when p does not exist.
func (m merged) resolve(p string) (int, string, error) {
	for hops := 0; ; hops++ {
		if hops > maxSymlinkHops {
			return -1, "", fmt.Errorf("too many levels of symbolic links")
		}
		next, done, err := m.walk(p)
		if err != nil || done {
			return next.layer, next.name, err
		}
		p = next.name
	}
}

type resolved struct {
	layer int
	name  string
}

// walk resolves p's components in turn. When a component is a symlink it
// returns the rewritten path and done=false; otherwise the final answer.
func (m merged) walk(p string) (resolved, bool, error) {
	parts := strings.Split(p, "/")
	cur := ""
	for k, c := range parts {
		cur = path.Join(cur, c)
		i, e := m.entryAt(cur)
		last := k == len(parts)-1
		if e == nil {
			if last {
				return resolved{layer: -1}, true, nil
			}
			continue // a directory implied by deeper names
		}
		switch e.Type {
		case artifact.TypeSymlink:
			target := e.Linkname
			if !strings.HasPrefix(target, "/") {
				target = path.Join(path.Dir("/"+cur), target)
			}
			rest := strings.Join(parts[k+1:], "/")
			return resolved{name: cleanRel(path.Join(target, rest))}, false, nil
		case artifact.TypeDir:
			if last {
				return resolved{layer: i}, true, errNotRegular
			}
		case artifact.TypeReg:
			if last {
				return resolved{layer: i, name: e.Name}, true, nil
			}
			return resolved{layer: -1}, true, nil // a file used as a directory
		case artifact.TypeHardlink:
			if !last {
				return resolved{layer: -1}, true, nil
			}
			t, ok := m[i].names[cleanRel(e.Linkname)]
			if !ok || t.Type != artifact.TypeReg {
				return resolved{layer: i}, true, errNotRegular
			}
			return resolved{layer: i, name: t.Name}, true, nil
		default:
			if last {
				return resolved{layer: i}, true, errNotRegular
			}
			return resolved{layer: -1}, true, nil
		}
	}
	return resolved{layer: -1}, true, nil
}

// cleanRel turns a path (absolute or relative) into a clean relative one,
// "" for the root.
func cleanRel(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}

// AssignPrefetch splits list (paths in the image's merged filesystem, in
// order) among the image's layers, given their TOCs bottom first: each
// regular file goes to the top-most layer that provides it, under that
// layer's TOC name (hardlinks and symlinks resolved), each once, in list
// order, with its byte ranges (a file listed twice gets the union; whole
// if either is). It returns the per-layer lists and ranges and the paths
// the image does not have. Paths that are not regular files (directories,
// devices) are left out and returned in skipped; paths with ranges past
// the end of their file are returned in beyond, their ranges cut to it.
func AssignPrefetch(tocs []*artifact.TOC, list []PrefetchFile) (perLayer [][]string, ranges [][]artifact.FileRanges, missing, skipped, beyond []string) {
	m := make(merged, len(tocs))
	for i, t := range tocs {
		m[i] = newLayerView(t)
	}
	perLayer = make([][]string, len(tocs))
	type listed struct {
		whole  bool
		ranges []artifact.Range
	}
	got := make([]map[string]*listed, len(tocs))
	for i := range got {
		got[i] = map[string]*listed{}
	}
	for _, f := range list {
		p := cleanRel(f.Path)
		if p == "" {
			skipped = append(skipped, f.Path)
			continue
		}
		i, name, err := m.resolve(p)
		switch {
		case err != nil:
			skipped = append(skipped, f.Path)
			continue
		case i < 0:
			missing = append(missing, f.Path)
			continue
		}
		l := got[i][name]
		if l == nil {
			l = &listed{}
			got[i][name] = l
			perLayer[i] = append(perLayer[i], name)
		}
		if len(f.Ranges) == 0 {
			l.whole = true
			continue
		}
		size := m[i].names[name].Size
		cut := false
		for _, r := range f.Ranges {
			if r.End() > size {
				cut = true
				r.Size = size - r.Offset
			}
			if r.Size > 0 {
				l.ranges = append(l.ranges, r)
			}
		}
		if cut {
			beyond = append(beyond, f.Path)
		}
	}
	ranges = make([][]artifact.FileRanges, len(tocs))
	for i, names := range perLayer {
		for _, name := range names {
			l := got[i][name]
			if l.whole || len(l.ranges) == 0 {
				continue // whole, or every range past the end: the whole file
			}
			rs := artifact.MergeRanges(l.ranges)
			if size := m[i].names[name].Size; len(rs) == 1 && rs[0].Offset == 0 && rs[0].Size == size {
				continue // the whole file, said as a range
			}
			ranges[i] = append(ranges[i], artifact.FileRanges{Name: name, Ranges: rs})
		}
	}
	return perLayer, ranges, missing, skipped, beyond
}

// fetchTOC reads and decodes a TOC blob from the registry.
func (cv *converter) fetchTOC(ctx context.Context, d artifact.Descriptor) (*artifact.TOC, error) {
	if t, ok := cv.tocs[d.Digest]; ok {
		return t, nil
	}
	if d.Size > maxTOCBytes {
		return nil, fmt.Errorf("TOC %s: %d bytes, limit %d", d.Digest, d.Size, maxTOCBytes)
	}
	rc, err := cv.c.FetchBlob(ctx, cv.ref, ociDesc(d))
	if err != nil {
		return nil, fmt.Errorf("fetch TOC %s: %w", d.Digest, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("fetch TOC %s: %w", d.Digest, err)
	}
	t, err := artifact.DecodeTOC(bytes.NewReader(b), artifact.Limits{})
	if err != nil {
		return nil, fmt.Errorf("decode TOC %s: %w", d.Digest, err)
	}
	return t, nil
}

// withPrefetch gives the layers of an artifact the prefetch lists of
// cv.opts.PrefetchList: for each layer whose TOC lists other files, a new
// TOC is pushed (the streaming blob stays). It returns the new layers,
// reports updated with their prefetch lists, and whether any TOC changed.
func (cv *converter) withPrefetch(ctx context.Context, subject ocispec.Descriptor, layers []artifact.Layer, reps []LayerReport) ([]artifact.Layer, bool, error) {
	l := log.G(ctx).WithFields(log.Fields{"image": cv.ref.String(), "manifest": subject.Digest, "op": "prefetch"})
	tocs := make([]*artifact.TOC, len(layers))
	for i, ly := range layers {
		t, err := cv.fetchTOC(ctx, ly.TOC)
		if err != nil {
			return nil, false, fmt.Errorf("layer %d (%s): %w", i, ly.Original, err)
		}
		tocs[i] = t
	}
	per, ranges, missing, skipped, beyond := AssignPrefetch(tocs, cv.opts.PrefetchList)
	if len(skipped) > 0 {
		l.WithField("paths", skipped).Warn("prefetch list entries that are not regular files are left out")
	}
	if len(missing) > 0 {
		if !cv.opts.PrefetchIgnoreMissing {
			return nil, false, fmt.Errorf("%w: %s", ErrPrefetchMissing, quoteList(missing, 10))
		}
		l.WithField("paths", missing).Warn("prefetch list entries not in the image are ignored")
	}
	if len(beyond) > 0 {
		if !cv.opts.PrefetchIgnoreMissing {
			return nil, false, fmt.Errorf("%w: %s", ErrPrefetchBeyond, quoteList(beyond, 10))
		}
		l.WithField("paths", beyond).Warn("prefetch list ranges past the end of their files are cut to it")
	}
	out := slices.Clone(layers)
	changed := false
	for i, t := range tocs {
		if slices.Equal(t.Prefetch, per[i]) && slices.EqualFunc(t.PrefetchRanges, ranges[i], equalFileRanges) {
			reps[i].Prefetch = len(per[i])
			continue
		}
		nt := *t
		nt.Prefetch, nt.PrefetchRanges = per[i], ranges[i]
		if err := nt.Validate(artifact.Limits{}); err != nil {
			return nil, false, fmt.Errorf("layer %d (%s): prefetch list: %w", i, layers[i].Original, err)
		}
		b, d, err := nt.Marshal()
		if err != nil {
			return nil, false, fmt.Errorf("layer %d (%s): encode TOC: %w", i, layers[i].Original, err)
		}
		desc := ocispec.Descriptor{MediaType: artifact.MediaTypeTOC, Digest: d, Size: int64(len(b))}
		if err := cv.ensureBlob(ctx, desc, func() (io.Reader, error) { return bytes.NewReader(b), nil }); err != nil {
			return nil, false, fmt.Errorf("layer %d (%s): push TOC: %w", i, layers[i].Original, err)
		}
		cv.tocs[d] = &nt
		out[i].TOC = artDesc(desc)
		reps[i].TOC = desc
		reps[i].Prefetch = len(per[i])
		changed = true
		l.WithFields(log.Fields{"layer": layers[i].Original, "toc": d, "files": len(per[i])}).Info("layer prefetch list set")
	}
	return out, changed, nil
}

// revise makes a new revision of an existing artifact whose prefetch lists
// differ from the requested ones: new TOCs, the same streaming blobs, a
// manifest created later (so that it wins), and then the old manifest is
// deleted, when the registry allows it.
func (cv *converter) revise(ctx context.Context, res Result, existing *artifact.Manifest, old ocispec.Descriptor) (Result, error) {
	subject := res.Subject
	l := log.G(ctx).WithFields(log.Fields{"image": cv.ref.String(), "manifest": subject.Digest, "artifact": old.Digest, "op": "revise"})
	res.Artifact, res.Existing = old, true
	res.Layers = nil
	for _, ly := range existing.Layers {
		res.Layers = append(res.Layers, LayerReport{Original: ly.Original, DiffID: ly.DiffID, Blob: ociDesc(ly.Blob), TOC: ociDesc(ly.TOC), Reused: true})
	}
	layers, changed, err := cv.withPrefetch(ctx, subject, existing.Layers, res.Layers)
	if err != nil {
		return res, fmt.Errorf("image %s: %w", subject.Digest, err)
	}
	if !changed {
		l.Info("streaming artifact already has this prefetch list")
		return res, nil
	}
	created := cv.opts.Created()
	if !created.After(existing.Created) {
		created = existing.Created.Add(time.Millisecond)
	}
	adesc, err := cv.pushArtifact(ctx, subject, layers, created)
	if err != nil {
		return res, err
	}
	res.Artifact, res.Existing, res.Replaced = adesc, false, old
	l = l.WithField("revision", adesc.Digest)
	l.Info("new streaming artifact revision pushed")
	if err := cv.c.DeleteManifest(ctx, cv.ref, old); err != nil {
		res.ReplacedRemains = true
		if errors.Is(err, fetcher.ErrDeleteRefused) {
			l.WithError(err).Warn("the registry refuses deletes: the older artifact revision remains, superseded by the newer one")
		} else {
			l.WithError(err).Warn("could not delete the older artifact revision; it remains, superseded by the newer one")
		}
	}
	return res, nil
}

// pushArtifact pushes the artifact manifest of layers (whose blobs are all
// in the registry) and indexes it as a referrer of subject.
func (cv *converter) pushArtifact(ctx context.Context, subject ocispec.Descriptor, layers []artifact.Layer, created time.Time) (ocispec.Descriptor, error) {
	mb, err := artifact.BuildManifest(subject, layers, created)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("image %s: %w", subject.Digest, err)
	}
	cfg := artifact.EmptyConfig()
	if err := cv.ensureBlob(ctx, cfg, func() (io.Reader, error) { return bytes.NewReader(artifact.EmptyConfigBytes), nil }); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("image %s: push artifact config: %w", subject.Digest, err)
	}
	adesc, err := cv.c.PushManifest(ctx, cv.ref, ocispec.MediaTypeImageManifest, mb, "")
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("image %s: push streaming artifact: %w", subject.Digest, err)
	}
	adesc.ArtifactType = artifact.ArtifactType
	adesc.Annotations = map[string]string{artifact.AnnotationCreated: created.UTC().Format(time.RFC3339Nano)}
	if err := cv.c.AddReferrer(ctx, cv.ref, subject, adesc); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("image %s: %w", subject.Digest, err)
	}
	return adesc, nil
}

// quoteList renders at most n paths, saying how many more there are.
func quoteList(ps []string, n int) string {
	if len(ps) <= n {
		return strings.Join(ps, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(ps[:n], ", "), len(ps)-n)
}
