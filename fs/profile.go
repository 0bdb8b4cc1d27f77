package fs

import (
	"context"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
)

// Startup profiles: for a while after a layer mounts, the Manager notes
// which files of the layer the filesystem reads first, per image, in order.
// It watches the chunk reader it gives the filesystem rather than the FUSE
// requests: the converter cuts chunks at file boundaries, so a chunk of
// file data belongs to exactly one regular file, and only reads of file
// data reach the reader (prefetch and background work do not go through
// it). The kernel's page cache hides repeated reads, not first ones.

// maxProfileFiles bounds the files recorded per image.
const maxProfileFiles = 1 << 16

// profiles holds the recorded first-read order of every image.
type profiles struct {
	mu     sync.Mutex
	images map[string]*imageProfile
}

type imageProfile struct {
	files []*profiledFile
	seen  map[string]*profiledFile
}

// profiledFile is a file read at startup: the parts of it read, sorted
// and merged, and its size.
type profiledFile struct {
	path   string
	size   int64
	ranges []artifact.Range
}

// ProfiledFile is one file of a startup profile: its path in the image
// and, when the startup read only parts of it, those byte ranges (at the
// granularity of the layer's chunks, the unit the filesystem fetches).
type ProfiledFile struct {
	Path   string
	Ranges []artifact.Range // nil: the whole file was read
}

// add records that r of the file at path (size bytes) was read: the file
// goes to the end of image's profile unless it is there already.
func (p *profiles) add(image, path string, size int64, r artifact.Range) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.images == nil {
		p.images = map[string]*imageProfile{}
	}
	ip := p.images[image]
	if ip == nil {
		ip = &imageProfile{seen: map[string]*profiledFile{}}
		p.images[image] = ip
	}
	f := ip.seen[path]
	if f == nil {
		if len(ip.files) >= maxProfileFiles {
			return
		}
		f = &profiledFile{path: path, size: size}
		ip.seen[path] = f
		ip.files = append(ip.files, f)
	}
	f.size = max(f.size, size)
	f.ranges = artifact.MergeRanges(append(f.ranges, r))
}

func (p *profiles) get(image string) ([]ProfiledFile, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ip, ok := p.images[image]
	if !ok {
		return nil, false
	}
	out := make([]ProfiledFile, len(ip.files))
	for i, f := range ip.files {
		out[i].Path = f.path
		if len(f.ranges) != 1 || f.ranges[0].Offset != 0 || f.ranges[0].Size < f.size {
			out[i].Ranges = slices.Clone(f.ranges)
		}
	}
	return out, true
}

func (p *profiles) reset(image string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.images, image)
}

func (p *profiles) list() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.images))
	for im := range p.images {
		out = append(out, im)
	}
	sort.Strings(out)
	return out
}

// profileKey is the form image references are recorded and looked up in,
// so that "host/repo:tag" and its normalised spelling meet.
func profileKey(image string) string {
	if ref, err := fetcher.ParseRef(image); err == nil {
		return ref.String()
	}
	return image
}

// Profile returns the files the containers of image read first, in the
// order they were first read, as absolute paths inside the image, each
// with the parts of it read when not all of it: the reads of each layer
// during the first RecordWindow after it mounted. It reports false when
// nothing was recorded for image.
func (m *Manager) Profile(image string) ([]ProfiledFile, bool) {
	return m.profiles.get(profileKey(image))
}

// ResetProfile forgets the profile of image, so that the next start of it
// records a profile of its own; layers keep recording only within
// RecordWindow of their mount.
func (m *Manager) ResetProfile(image string) { m.profiles.reset(profileKey(image)) }

// ProfiledImages lists the images with a recorded profile.
func (m *Manager) ProfiledImages() []string { return m.profiles.list() }

// fileSpan is where a regular file's data lies in the layer tar.
type fileSpan struct {
	off, end int64
	path     string // absolute, in the image
}

// recordingReader passes chunk reads to the layer's reader and notes, until
// a deadline, the file each chunk belongs to and the part of it the chunk
// holds.
type recordingReader struct {
	r     *remoteReader
	image string
	rec   *profiles
	until time.Time
	files []fileSpan // sorted by off, disjoint
	over  atomic.Bool

	mu   sync.Mutex
	seen map[int64]bool // offsets of the chunks noted
}

var (
	_ ChunkReader  = (*recordingReader)(nil)
	_ ChunksReader = (*recordingReader)(nil)
)

func newRecordingReader(r *remoteReader, toc *artifact.TOC, image string, rec *profiles, window time.Duration) *recordingReader {
	rr := &recordingReader{r: r, image: profileKey(image), rec: rec, until: time.Now().Add(window), seen: map[int64]bool{}}
	for _, e := range toc.Entries {
		if e.Type != artifact.TypeReg || e.Size <= 0 {
			continue
		}
		name, ok := cleanName(e.Name)
		if !ok || name == "" {
			continue
		}
		rr.files = append(rr.files, fileSpan{off: e.Offset, end: e.Offset + e.Size, path: "/" + name})
	}
	// Tar order is offset order already; sort anyway, a TOC may be odd.
	sort.SliceStable(rr.files, func(i, j int) bool { return rr.files[i].off < rr.files[j].off })
	return rr
}

// note records the file chunk c holds and the part of it, the first time
// c is read.
func (rr *recordingReader) note(c artifact.Chunk) {
	if rr.over.Load() {
		return
	}
	if time.Now().After(rr.until) {
		rr.over.Store(true)
		return
	}
	i := sort.Search(len(rr.files), func(i int) bool { return rr.files[i].end > c.Offset })
	if i == len(rr.files) || rr.files[i].off >= c.Offset+c.Size {
		return // headers between files: no file's data
	}
	rr.mu.Lock()
	first := !rr.seen[c.Offset]
	rr.seen[c.Offset] = true
	rr.mu.Unlock()
	if first {
		f := rr.files[i]
		lo, hi := max(c.Offset, f.off), min(c.Offset+c.Size, f.end)
		rr.rec.add(rr.image, f.path, f.end-f.off, artifact.Range{Offset: lo - f.off, Size: hi - lo})
	}
}

var _ pushNoter = (*recordingReader)(nil)

// pushing notes a listed file a process opened and the filesystem pushes
// into the page cache, with the parts pushed: the reads of those parts
// never reach the reader, so the profile takes them as read (an image
// recorded again with its list keeps the parts the kernel served).
func (rr *recordingReader) pushing(e *artifact.Entry, parts []artifact.Range) {
	if rr.over.Load() || time.Now().After(rr.until) || e.Size <= 0 {
		return
	}
	name, ok := cleanName(e.Name)
	if !ok || name == "" {
		return
	}
	if parts == nil {
		parts = []artifact.Range{{Offset: 0, Size: e.Size}}
	}
	for _, r := range parts {
		rr.rec.add(rr.image, "/"+name, e.Size, r)
	}
}

// ReadChunk notes the chunk's file and reads it.
func (rr *recordingReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	if ctx.Value(noRecord{}) == nil {
		rr.note(c)
	}
	return rr.r.ReadChunk(ctx, c)
}

// ReadChunks notes the chunks' files in order and reads them.
func (rr *recordingReader) ReadChunks(ctx context.Context, cs []artifact.Chunk) ([][]byte, error) {
	if ctx.Value(noRecord{}) == nil {
		for _, c := range cs {
			rr.note(c)
		}
	}
	return rr.r.ReadChunks(ctx, cs)
}
