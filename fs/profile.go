package fs

import (
	"context"
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
	files []string
	seen  map[string]bool
}

// add appends path to image's profile unless it is there already.
func (p *profiles) add(image, path string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.images == nil {
		p.images = map[string]*imageProfile{}
	}
	ip := p.images[image]
	if ip == nil {
		ip = &imageProfile{seen: map[string]bool{}}
		p.images[image] = ip
	}
	if ip.seen[path] || len(ip.files) >= maxProfileFiles {
		return
	}
	ip.seen[path] = true
	ip.files = append(ip.files, path)
}

func (p *profiles) get(image string) ([]string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ip, ok := p.images[image]
	if !ok {
		return nil, false
	}
	return append([]string(nil), ip.files...), true
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
// order they were first read, as absolute paths inside the image: the
// reads of each layer during the first RecordWindow after it mounted. It
// reports false when nothing was recorded for image.
func (m *Manager) Profile(image string) ([]string, bool) {
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
// a deadline, the file each chunk belongs to.
type recordingReader struct {
	r     *remoteReader
	image string
	rec   *profiles
	until time.Time
	files []fileSpan // sorted by off, disjoint
	over  atomic.Bool

	mu   sync.Mutex
	seen map[int]bool // indexes into files
}

var (
	_ ChunkReader  = (*recordingReader)(nil)
	_ ChunksReader = (*recordingReader)(nil)
)

func newRecordingReader(r *remoteReader, toc *artifact.TOC, image string, rec *profiles, window time.Duration) *recordingReader {
	rr := &recordingReader{r: r, image: profileKey(image), rec: rec, until: time.Now().Add(window), seen: map[int]bool{}}
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

// note records the file chunk c holds, if it is the first read of it.
func (rr *recordingReader) note(c artifact.Chunk) {
	if rr.over.Load() {
		return
	}
	if time.Now().After(rr.until) {
		rr.over.Store(true)
		return
	}
	i := sort.Search(len(rr.files), func(i int) bool { return rr.files[i].end > c.Offset })
	if i == len(rr.files) || rr.files[i].off > c.Offset {
		return // headers between files: no file's data
	}
	rr.mu.Lock()
	first := !rr.seen[i]
	rr.seen[i] = true
	rr.mu.Unlock()
	if first {
		rr.rec.add(rr.image, rr.files[i].path)
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
