// Package cache stores verified chunks by digest: on disk (content
// addressed, bounded, written atomically; a large chunk in a file of its
// own, the small chunks of one fetched run together in a pack) behind a
// bounded in-memory LRU, with single-flight fetching so each chunk is
// fetched once however many readers want it.
package cache

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Defaults for zero Options fields.
const (
	// DefaultMaxBytes bounds the disk tier when Options.MaxBytes is 0.
	DefaultMaxBytes = 10 << 30
	// DefaultMemoryBytes bounds the memory tier when Options.MemoryBytes is 0.
	DefaultMemoryBytes = 64 << 20
)

var (
	// ErrDigestMismatch: bytes offered to the store do not match their digest.
	ErrDigestMismatch = errors.New("cache: digest mismatch")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("cache: closed")
)

// Options configure a Store.
type Options struct {
	// Dir holds the chunks; it is created if missing. One Store per Dir.
	Dir string
	// MaxBytes bounds the chunk bytes kept on disk (file contents, not
	// blocks); 0 means DefaultMaxBytes. Least recently used chunks go first.
	MaxBytes int64
	// MemoryBytes bounds the in-memory tier; 0 means DefaultMemoryBytes,
	// negative disables it.
	MemoryBytes int64
}

// Stats count what a Store did since Open.
type Stats struct {
	MemoryHits int64 // Get answered from memory
	DiskHits   int64 // Get answered from disk
	Misses     int64 // Get found nothing usable
	Evictions  int64 // chunks removed from disk to stay under MaxBytes
	Corrupted  int64 // chunk files that failed verification and were removed
	Fetches    int64 // fetch functions run by Do
}

// Store is a two-tier chunk store. Its methods are safe for concurrent use.
// Byte slices it returns are shared and must not be modified.
type Store struct {
	dir      string
	maxBytes int64
	memMax   int64

	ctx    context.Context // canceled by Close; parent of every fetch
	cancel context.CancelFunc
	wg     sync.WaitGroup // fetch goroutines

	mu      sync.Mutex
	closed  bool
	disk    map[digest.Digest]*list.Element // value: *diskEntry
	diskLRU *list.List                      // front: most recently used
	size    int64
	mem     map[digest.Digest]*list.Element // value: *memEntry
	memLRU  *list.List
	memSize int64
	flights map[digest.Digest]*flight
	pins    map[digest.Digest]int // chunks spared by eviction, by pin count

	openPacks *openPacks  // open pack files, for reads
	dirs      sync.Map    // chunk directories known to exist
	noTmpfile atomic.Bool // the filesystem refused O_TMPFILE

	memoryHits, diskHits, misses, evictions, corrupted, fetches atomic.Int64
}

// diskEntry is a chunk on disk: its own file at path(d), or size bytes at
// off in a pack.
type diskEntry struct {
	d    digest.Digest
	size int64
	pack *pack // nil: a file of its own
	off  int64
}

// file returns the path of the file that holds the chunk.
func (e *diskEntry) file(s *Store) string {
	if e.pack != nil {
		return e.pack.path
	}
	return s.path(e.d)
}

type memEntry struct {
	d digest.Digest
	b []byte
}

// flight is one fetch shared by every concurrent Do of a digest.
type flight struct {
	done    chan struct{} // closed when b, err are set
	b       []byte
	err     error
	waiters int // callers still waiting; guarded by Store.mu
	cancel  context.CancelFunc
}

// tmpDir holds files being written; it is emptied on Open, so a crash never
// leaves a partial chunk where a whole one is looked for.
const tmpDir = "tmp"

// Open opens (creating if needed) the store in opts.Dir and indexes the
// chunks already there, oldest modification time least recently used, so
// a restarted daemon reuses them.
func Open(opts Options) (*Store, error) {
	if opts.Dir == "" {
		return nil, errors.New("open cache: no directory")
	}
	if opts.MaxBytes < 0 {
		return nil, fmt.Errorf("open cache %s: negative MaxBytes %d", opts.Dir, opts.MaxBytes)
	}
	if opts.MaxBytes == 0 {
		opts.MaxBytes = DefaultMaxBytes
	}
	if opts.MemoryBytes == 0 {
		opts.MemoryBytes = DefaultMemoryBytes
	}
	s := &Store{
		dir:       opts.Dir,
		maxBytes:  opts.MaxBytes,
		memMax:    max(opts.MemoryBytes, 0),
		disk:      make(map[digest.Digest]*list.Element),
		diskLRU:   list.New(),
		mem:       make(map[digest.Digest]*list.Element),
		memLRU:    list.New(),
		flights:   make(map[digest.Digest]*flight),
		openPacks: newOpenPacks(openPacksMax),
	}
	tmp := filepath.Join(s.dir, tmpDir)
	if err := os.RemoveAll(tmp); err != nil {
		return nil, fmt.Errorf("open cache %s: remove leftover temporary files: %w", s.dir, err)
	}
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return nil, fmt.Errorf("open cache %s: %w", s.dir, err)
	}
	if err := s.index(); err != nil {
		return nil, fmt.Errorf("open cache %s: index chunks: %w", s.dir, err)
	}
	s.mu.Lock()
	s.evictLocked(nil, nil)
	s.mu.Unlock()
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// path maps a digest to its file: dir/<algorithm>/<first two hex>/<hex>.
// It is the only place that builds chunk paths. d must be valid.
func (s *Store) path(d digest.Digest) string {
	enc := d.Encoded()
	return filepath.Join(s.dir, d.Algorithm().String(), enc[:2], enc)
}

// index loads the chunk files under dir into the disk LRU.
func (s *Store) index() error {
	type found struct {
		d     digest.Digest
		size  int64
		mtime time.Time
		pack  *pack
		off   int64
	}
	var all []found
	for _, alg := range []digest.Algorithm{digest.SHA256} {
		err := walkChunkFiles(s.dir, alg, func(p string, de fs.DirEntry) error {
			d := digest.NewDigestFromEncoded(alg, de.Name())
			info, err := de.Info()
			if err != nil {
				return err
			}
			if validDigest(d) != nil || !de.Type().IsRegular() || s.path(d) != p {
				logrus.WithFields(logrus.Fields{"op": "cache-index", "path": p}).Warn("removing stray file from chunk cache")
				return os.Remove(p)
			}
			all = append(all, found{d: d, size: info.Size(), mtime: info.ModTime()})
			return nil
		})
		if err != nil {
			return err
		}
	}
	packs, err := listPacks(s.dir)
	if err != nil {
		return err
	}
	var pks []*pack
	for _, de := range packs {
		p := filepath.Join(s.dir, packDir, de.Name())
		pk, ents, mtime, err := openPack(p, de)
		if err != nil {
			logrus.WithError(err).WithFields(logrus.Fields{"op": "cache-index", "path": p}).Warn("removing unreadable pack from chunk cache")
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			continue
		}
		pks = append(pks, pk)
		for _, e := range ents {
			all = append(all, found{d: e.d, size: e.size, mtime: mtime, pack: pk, off: e.off})
		}
	}
	// Oldest first, so the newest copy of a chunk stored twice (in a
	// pack and a file, or in two packs: concurrent puts) is the one
	// indexed.
	sort.SliceStable(all, func(i, j int) bool { return all[i].mtime.Before(all[j].mtime) })
	for _, f := range all {
		if el, ok := s.disk[f.d]; ok {
			if f.pack != nil && el.Value.(*diskEntry).pack == f.pack {
				continue // listed twice in one pack (a damaged header)
			}
			s.dropLocked(el, "cache-index")
		}
		s.disk[f.d] = s.diskLRU.PushFront(&diskEntry{d: f.d, size: f.size, pack: f.pack, off: f.off})
		if f.pack == nil {
			s.size += f.size
			continue
		}
		if f.pack.live == 0 {
			s.size += f.pack.bytes
		}
		f.pack.live++
	}
	// Packs none of whose chunks was indexed hold nothing.
	for _, pk := range pks {
		if pk.live == 0 {
			if err := os.Remove(pk.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}

// walkChunkFiles calls fn for each file under dir's tree of chunk files
// of algorithm alg (a missing tree has none).
func walkChunkFiles(dir string, alg digest.Algorithm, fn func(p string, de fs.DirEntry) error) error {
	return filepath.WalkDir(filepath.Join(dir, alg.String()), func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if de.IsDir() {
			return nil
		}
		return fn(p, de)
	})
}

// listPacks lists dir's packs directory (a missing one has none).
func listPacks(dir string) ([]fs.DirEntry, error) {
	ents, err := os.ReadDir(filepath.Join(dir, packDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return ents, err
}

// openPack reads the header of the pack file at p.
func openPack(p string, de fs.DirEntry) (*pack, []packEntry, time.Time, error) {
	if !de.Type().IsRegular() {
		return nil, nil, time.Time{}, errors.New("not a regular file")
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	ents, err := readPackHeader(f, info.Size())
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	pk := &pack{path: p, ds: make([]digest.Digest, len(ents))}
	for i, e := range ents {
		pk.ds[i] = e.d
		pk.bytes += e.size
	}
	return pk, ents, info.ModTime(), nil
}

// verify reports whether b hashes to d.
func verify(d digest.Digest, b []byte) bool {
	return d.Algorithm().FromBytes(b) == d
}

// Get returns the chunk d from memory or disk. Bytes read from disk are
// verified again; a file that fails is removed and reported as a miss.
func (s *Store) Get(d digest.Digest) ([]byte, bool) { return s.get(d, true, true) }

// GetCold is Get for a pass over many chunks nobody is reading now (a
// layer's completion check): it neither fills the memory cache nor
// changes the recency of what it reads.
func (s *Store) GetCold(d digest.Digest) ([]byte, bool) { return s.get(d, false, true) }

// GetColdUnchecked is GetCold without checking bytes read from disk
// against d, for a pass that hashes everything it reads anyway and goes
// back to GetCold for the chunks when that hash does not match (a layer's
// completion check, which checks the whole tar against its diffID).
func (s *Store) GetColdUnchecked(d digest.Digest) ([]byte, bool) { return s.get(d, false, false) }

// ReadColdUnchecked is GetColdUnchecked reading a chunk from disk into buf
// (grown when short) instead of a new slice, for a pass over a whole
// layer that keeps no chunk: the bytes returned are buf's, or the memory
// tier's own (not to be written to), until the next call.
func (s *Store) ReadColdUnchecked(d digest.Digest, buf []byte) ([]byte, bool) {
	return s.getInto(d, false, false, buf)
}

func (s *Store) get(d digest.Digest, promote, check bool) ([]byte, bool) {
	return s.getInto(d, promote, check, nil)
}

// getInto reads chunk d, from disk into buf when its capacity holds it.
func (s *Store) getInto(d digest.Digest, promote, check bool, buf []byte) ([]byte, bool) {
	if validDigest(d) != nil {
		s.misses.Add(1)
		return nil, false
	}
	s.mu.Lock()
	if el, ok := s.mem[d]; ok {
		if promote {
			s.memLRU.MoveToFront(el)
			if del, ok := s.disk[d]; ok {
				s.diskLRU.MoveToFront(del)
			}
		}
		b := el.Value.(*memEntry).b
		s.mu.Unlock()
		s.memoryHits.Add(1)
		return b, true
	}
	seen, onDisk := s.disk[d]
	s.mu.Unlock()
	if !onDisk {
		s.misses.Add(1)
		return nil, false
	}

	// An entry's fields are fixed once indexed: read them unlocked.
	e := seen.Value.(*diskEntry)
	p := e.file(s)
	var b []byte
	var err error
	if e.pack != nil {
		b, err = s.readPacked(e, buf)
	} else {
		b, err = readFileInto(p, buf)
	}
	if err != nil || (check && !verify(d, b)) {
		s.mu.Lock()
		// Unless a concurrent Put replaced it meanwhile, forget the
		// chunk and remove what is left of its file. A damaged pack goes
		// whole: its other chunks are fetched again rather than read from
		// a file known bad.
		if s.disk[d] == seen {
			if e.pack != nil {
				s.dropPackLocked(e.pack, "cache-get")
			} else {
				s.dropLocked(seen, "cache-get")
			}
		}
		s.mu.Unlock()
		if err == nil {
			s.corrupted.Add(1)
			logrus.WithFields(logrus.Fields{"op": "cache-get", "chunk": d, "path": p}).Warn("cached chunk failed verification; removed")
		} else if !errors.Is(err, fs.ErrNotExist) {
			logrus.WithError(err).WithFields(logrus.Fields{"op": "cache-get", "chunk": d}).Warn("read cached chunk")
		}
		s.misses.Add(1)
		return nil, false
	}
	if !promote {
		s.diskHits.Add(1)
		return b, true
	}
	// Persist recency so a restart keeps the LRU order roughly right (a
	// pack's is its most recently read chunk's).
	now := time.Now()
	_ = os.Chtimes(p, now, now)
	s.mu.Lock()
	if el, ok := s.disk[d]; ok {
		s.diskLRU.MoveToFront(el)
	}
	s.addMemLocked(d, b)
	s.mu.Unlock()
	s.diskHits.Add(1)
	return b, true
}

// readFileInto reads the file at p into buf when its capacity holds it (a
// new slice otherwise).
func readFileInto(p string, buf []byte) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	b := sized(buf, st.Size())
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	return b, nil
}

// sized returns buf holding n bytes, or a new slice when its capacity is
// short.
func sized(buf []byte, n int64) []byte {
	if int64(cap(buf)) < n {
		return make([]byte, n)
	}
	return buf[:n]
}

// Has reports whether chunk d is stored, without reading or verifying it.
func (s *Store) Has(d digest.Digest) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, inMem := s.mem[d]
	_, onDisk := s.disk[d]
	return inMem || onDisk
}

// Put stores b as chunk d after checking that b hashes to d. It keeps its
// own copy of b. A chunk larger than MaxBytes is kept in memory only.
func (s *Store) Put(d digest.Digest, b []byte) error {
	if err := checkPut(d, b); err != nil {
		return err
	}
	return s.PutVerified(d, b, false)
}

// PutCold stores a chunk that nobody is reading now (a background fetch):
// on disk only, so that the memory cache keeps the chunks being read
// rather than fill with a whole layer passing through. Verified as Put.
func (s *Store) PutCold(d digest.Digest, b []byte) error {
	if err := checkPut(d, b); err != nil {
		return err
	}
	return s.PutVerified(d, b, true)
}

// PutVerified is Put, or PutCold when cold, for bytes the caller has just
// hashed to d itself (a chunk artifact.DecodeChunk decoded and checked):
// it does not hash them a second time. d must be a valid digest.
func (s *Store) PutVerified(d digest.Digest, b []byte, cold bool) error {
	if err := validDigest(d); err != nil {
		return fmt.Errorf("cache put %q: %w", d, err)
	}
	if cold {
		return s.put(d, b, false)
	}
	return s.put(d, append([]byte(nil), b...), true)
}

// PutVerifiedRun is PutVerified for the chunks of one fetched run, ds[i]
// with bytes bs[i]: the chunks of at most PackMaxChunk bytes not on disk
// yet are written together into one pack file, the others a file each.
// Every d must be valid and the caller must have hashed bs[i] to ds[i].
// It keeps no reference to bs (the memory tier takes copies): the caller
// may reuse the buffers once it returns.
func (s *Store) PutVerifiedRun(ds []digest.Digest, bs [][]byte, cold bool) error {
	if len(ds) != len(bs) {
		return fmt.Errorf("cache put run: %d digests for %d chunks", len(ds), len(bs))
	}
	for _, d := range ds {
		if err := validDigest(d); err != nil {
			return fmt.Errorf("cache put %q: %w", d, err)
		}
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("cache put run of %d chunks: %w", len(ds), ErrClosed)
	}
	var packDs, singleDs []digest.Digest
	var packBs, singleBs [][]byte
	var packBytes int64
	inRun := make(map[digest.Digest]bool, len(ds))
	for i, d := range ds {
		if !cold {
			s.addMemLocked(d, append([]byte(nil), bs[i]...))
		}
		if el, ok := s.disk[d]; ok {
			s.diskLRU.MoveToFront(el)
			continue
		}
		if inRun[d] {
			continue
		}
		inRun[d] = true
		if len(bs[i]) <= PackMaxChunk && d.Algorithm() == digest.SHA256 && len(packDs) < packMaxCount {
			packDs, packBs = append(packDs, d), append(packBs, bs[i])
			packBytes += int64(len(bs[i]))
			continue
		}
		singleDs, singleBs = append(singleDs, d), append(singleBs, bs[i])
	}
	s.mu.Unlock()
	if len(packDs) < 2 || packBytes > s.maxBytes {
		singleDs, singleBs = append(singleDs, packDs...), append(singleBs, packBs...)
		packDs = nil
	}
	var errs []error
	for i, d := range singleDs {
		// put keeps no reference to bytes it is not told to keep in memory.
		if err := s.put(d, singleBs[i], false); err != nil {
			errs = append(errs, err)
		}
	}
	if len(packDs) > 0 {
		if err := s.putPack(packDs, packBs); err != nil {
			errs = append(errs, fmt.Errorf("cache put pack of %d chunks (%s...): %w", len(packDs), packDs[0], err))
		}
	}
	return errors.Join(errs...)
}

// putPack writes chunks ds into a new pack and indexes the ones that no
// concurrent put stored meanwhile.
func (s *Store) putPack(ds []digest.Digest, bs [][]byte) error {
	p, ents, err := s.writePack(ds, bs)
	if err != nil {
		return err
	}
	pk := &pack{path: p, ds: ds}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range ents {
		pk.bytes += e.size
	}
	var newest *list.Element
	for _, e := range ents {
		if el, ok := s.disk[e.d]; ok { // a concurrent put won
			s.diskLRU.MoveToFront(el)
			continue
		}
		newest = s.diskLRU.PushFront(&diskEntry{d: e.d, size: e.size, pack: pk, off: e.off})
		s.disk[e.d] = newest
		pk.live++
	}
	if newest == nil {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			logrus.WithError(err).WithFields(logrus.Fields{"op": "cache-put", "path": p}).Warn("remove pack of chunks stored meanwhile")
		}
		return nil
	}
	s.size += pk.bytes
	s.evictLocked(nil, pk)
	return nil
}

// checkPut checks that d is a valid digest and b hashes to it.
func checkPut(d digest.Digest, b []byte) error {
	if err := validDigest(d); err != nil {
		return fmt.Errorf("cache put %q: %w", d, err)
	}
	if !verify(d, b) {
		return fmt.Errorf("cache put %s: %w", d, ErrDigestMismatch)
	}
	return nil
}

// put stores verified bytes, which the store then owns and shares.
func (s *Store) put(d digest.Digest, b []byte, mem bool) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("cache put %s: %w", d, ErrClosed)
	}
	if mem {
		s.addMemLocked(d, b)
	}
	el, onDisk := s.disk[d]
	if onDisk {
		s.diskLRU.MoveToFront(el)
	}
	s.mu.Unlock()
	if onDisk || int64(len(b)) > s.maxBytes {
		return nil
	}

	// The file is written and made visible outside the lock, so that
	// reads and other puts never wait on the filesystem; it is indexed
	// under the lock once it is whole at its path.
	replaced, err := s.writeChunk(d, b)
	if err != nil {
		return fmt.Errorf("cache put %s: %w", d, err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if el, ok := s.disk[d]; ok { // a concurrent Put won
		s.diskLRU.MoveToFront(el)
		return nil
	}
	if replaced {
		// The path held a file nobody had indexed, which this put
		// replaced; an eviction of the same chunk may have removed it
		// since: index only what is there.
		if _, err := os.Lstat(s.path(d)); err != nil {
			return nil
		}
	}
	el = s.diskLRU.PushFront(&diskEntry{d: d, size: int64(len(b))})
	s.disk[d] = el
	s.size += int64(len(b))
	s.evictLocked(el, nil)
	return nil
}

// writeChunk makes b the file of chunk d, whole or not at all: written
// into an unnamed file of its directory (O_TMPFILE) and then linked to
// its name, which costs a fraction of a named temporary file renamed into
// place (no directory entry made and removed, no cross-directory rename,
// which the kernel serializes filesystem-wide), and leaves nothing behind
// when the daemon dies midway. Filesystems without O_TMPFILE get the named
// temporary file in tmpDir, renamed. replaced reports that a file was
// already at the path (a concurrent put of the same chunk, or a stray
// file) and was replaced by a rename.
func (s *Store) writeChunk(d digest.Digest, b []byte) (replaced bool, err error) {
	return s.writeFile(s.path(d), b)
}

// writeFile makes bs, back to back, the file p, whole or not at all, as
// writeChunk says; p's directory is made when missing. replaced reports
// that a file already at p was replaced by a rename.
func (s *Store) writeFile(p string, bs ...[]byte) (replaced bool, err error) {
	dir := filepath.Dir(p)
	if _, ok := s.dirs.Load(dir); !ok {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return false, err
		}
		s.dirs.Store(dir, true)
	}
	if !s.noTmpfile.Load() {
		err := linkTmpfile(dir, p, bs...)
		switch {
		case err == nil:
			return false, nil
		case errors.Is(err, unix.EEXIST):
			// Replace it below, by a rename.
		case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EINVAL):
			s.noTmpfile.Store(true)
			logrus.WithError(err).WithFields(logrus.Fields{"op": "cache-put", "dir": s.dir}).Info("cache filesystem has no O_TMPFILE: chunks are written to temporary files and renamed")
		default:
			return false, err
		}
	}
	if err := s.writeRenamed(p, bs...); err != nil {
		return false, err
	}
	return true, nil
}

// writeRenamed makes bs, back to back, the file p through a named
// temporary file in tmpDir renamed into place.
func (s *Store) writeRenamed(p string, bs ...[]byte) error {
	tmp, err := os.CreateTemp(filepath.Join(s.dir, tmpDir), "chunk-")
	if err != nil {
		return err
	}
	// No fsync: a chunk torn by a crash fails verification on its next Get
	// and is removed, so durability would buy nothing but latency.
	werr := writeAll(int(tmp.Fd()), bs)
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return nil
}

// linkTmpfile writes bs, back to back, to an unnamed file in dir and
// links it as p. It fails with EEXIST when p exists.
func linkTmpfile(dir, p string, bs ...[]byte) error {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("open unnamed file in %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := writeAll(fd, bs); err != nil {
		return err
	}
	// Linking by descriptor needs CAP_DAC_READ_SEARCH; through /proc it
	// does not.
	err = unix.Linkat(fd, "", unix.AT_FDCWD, p, unix.AT_EMPTY_PATH)
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOENT) {
		err = unix.Linkat(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", fd), unix.AT_FDCWD, p, unix.AT_SYMLINK_FOLLOW)
	}
	if err != nil {
		return fmt.Errorf("link %s: %w", p, err)
	}
	return nil
}

// evictLocked removes least recently used chunks until the disk tier fits
// MaxBytes, sparing keep (the chunk just added) and pinned chunks. When only
// pinned chunks are left the tier stays over its bound: the disk itself is
// then the limit, and a full disk only stops caching (see run).
//
// A chunk in a pack is evicted with the whole pack, which frees its file:
// the pack's chunks were written together and are used together (one
// layer's run), and a pack with a pinned chunk or the one just written
// (keepPack) stays whole.
func (s *Store) evictLocked(keep *list.Element, keepPack *pack) {
	for el := s.diskLRU.Back(); el != nil && s.size > s.maxBytes; {
		victim, e := el, el.Value.(*diskEntry)
		el = el.Prev()
		if e.pack == nil {
			if victim != keep && s.pins[e.d] == 0 {
				s.dropLocked(victim, "cache-evict")
				s.evictions.Add(1)
			}
			continue
		}
		// The pack's other chunks go or stay with it: step past them,
		// so that a pack is looked at once, not once a chunk.
		for el != nil && el.Value.(*diskEntry).pack == e.pack {
			el = el.Prev()
		}
		if e.pack != keepPack && !s.pinnedLocked(e.pack) {
			s.evictions.Add(int64(s.dropPackLocked(e.pack, "cache-evict")))
		}
	}
}

// dropPackLocked forgets every chunk indexed in pk and removes its file.
// It returns how many chunks it forgot.
func (s *Store) dropPackLocked(pk *pack, op string) int {
	n := 0
	for _, d := range pk.ds {
		if el, ok := s.disk[d]; ok && el.Value.(*diskEntry).pack == pk {
			s.dropLocked(el, op)
			n++
		}
	}
	return n
}

// pinnedLocked reports whether a chunk indexed in pk is pinned.
func (s *Store) pinnedLocked(pk *pack) bool {
	for _, d := range pk.ds {
		if s.pins[d] > 0 {
			if el, ok := s.disk[d]; ok && el.Value.(*diskEntry).pack == pk {
				return true
			}
		}
	}
	return false
}

// dropLocked forgets the chunk at el and removes its file, or its pack's
// when it was the pack's last indexed chunk. It returns the disk bytes
// freed.
func (s *Store) dropLocked(el *list.Element, op string) int64 {
	e := el.Value.(*diskEntry)
	s.diskLRU.Remove(el)
	delete(s.disk, e.d)
	freed := e.size
	if e.pack != nil {
		if e.pack.live--; e.pack.live > 0 {
			return 0
		}
		freed = e.pack.bytes
		s.openPacks.forget(e.pack)
	}
	s.size -= freed
	if err := os.Remove(e.file(s)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		logrus.WithError(err).WithFields(logrus.Fields{"op": op, "chunk": e.d, "path": e.file(s)}).Warn("remove cached chunk")
	}
	return freed
}

// addMemLocked keeps b in the memory tier, evicting its least recently
// used chunks to stay under the bound.
func (s *Store) addMemLocked(d digest.Digest, b []byte) {
	if int64(len(b)) > s.memMax {
		return
	}
	if el, ok := s.mem[d]; ok {
		s.memLRU.MoveToFront(el)
		return
	}
	s.mem[d] = s.memLRU.PushFront(&memEntry{d: d, b: b})
	s.memSize += int64(len(b))
	for s.memSize > s.memMax {
		el := s.memLRU.Back()
		e := el.Value.(*memEntry)
		s.memLRU.Remove(el)
		delete(s.mem, e.d)
		s.memSize -= int64(len(e.b))
	}
}

// Do returns chunk d, from the store or else by calling fetch. Concurrent
// calls for one digest share a single fetch. A caller whose ctx ends
// returns ctx.Err() at once while the fetch goes on for the others; when no
// caller is left the fetch is canceled. Fetched bytes that do not match d
// are an error wrapping ErrDigestMismatch and are never stored.
func (s *Store) Do(ctx context.Context, d digest.Digest, fetch func(ctx context.Context) ([]byte, error)) ([]byte, error) {
	if b, ok := s.Get(d); ok {
		return b, nil
	}
	if err := validDigest(d); err != nil {
		return nil, fmt.Errorf("cache fetch %q: %w", d, err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("cache fetch %s: %w", d, ErrClosed)
	}
	f, ok := s.flights[d]
	if !ok {
		// The fetch keeps the first caller's values (loggers, trace ids)
		// but not its deadline: it serves every caller.
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		stop := context.AfterFunc(s.ctx, cancel)
		f = &flight{done: make(chan struct{}), cancel: cancel}
		s.flights[d] = f
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer stop()
			defer cancel()
			s.run(fctx, d, f, fetch)
		}()
	}
	f.waiters++
	s.mu.Unlock()

	select {
	case <-f.done:
		return f.b, f.err
	case <-ctx.Done():
		s.mu.Lock()
		f.waiters--
		if f.waiters == 0 && s.flights[d] == f {
			// Nobody wants it any more; a later Do starts afresh rather
			// than joining a canceled fetch.
			delete(s.flights, d)
			f.cancel()
		}
		s.mu.Unlock()
		return nil, ctx.Err()
	}
}

// run performs one flight's fetch, stores a verified result, and releases
// the waiters.
func (s *Store) run(ctx context.Context, d digest.Digest, f *flight, fetch func(ctx context.Context) ([]byte, error)) {
	s.fetches.Add(1)
	b, err := fetch(ctx)
	switch {
	case err != nil:
		f.err = fmt.Errorf("cache fetch %s: %w", d, err)
	case !verify(d, b):
		f.err = fmt.Errorf("cache fetch %s: %w", d, ErrDigestMismatch)
	default:
		f.b = b
		if err := s.put(d, b, true); err != nil && !errors.Is(err, ErrClosed) {
			// The bytes are verified: serve them even if disk failed.
			msg := "store fetched chunk"
			if errors.Is(err, syscall.ENOSPC) {
				msg = "cache disk full: chunk served from the network, not cached"
			}
			logrus.WithError(err).WithFields(logrus.Fields{"op": "cache-put", "chunk": d}).Warn(msg)
		}
	}
	s.mu.Lock()
	if s.flights[d] == f {
		delete(s.flights, d)
	}
	s.mu.Unlock()
	close(f.done)
}

// Pin spares chunks ds from eviction until as many Unpin calls: the
// chunks of mounted layers stay on the node while any other chunk can go.
// Chunks not yet stored may be pinned too.
func (s *Store) Pin(ds []digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pins == nil {
		s.pins = map[digest.Digest]int{}
	}
	for _, d := range ds {
		s.pins[d]++
	}
}

// Unpin undoes one Pin of ds and evicts what the bound then requires.
func (s *Store) Unpin(ds []digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range ds {
		if s.pins[d] <= 1 {
			delete(s.pins, d)
		} else {
			s.pins[d]--
		}
	}
	s.evictLocked(nil, nil)
}

// Remove deletes the chunks ds that are not pinned, from disk and memory,
// and returns the disk bytes freed: the garbage collection of a layer no
// longer used on the node.
func (s *Store) Remove(ds []digest.Digest) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var freed int64
	for _, d := range ds {
		if s.pins[d] > 0 {
			continue
		}
		if el, ok := s.mem[d]; ok {
			s.memSize -= int64(len(el.Value.(*memEntry).b))
			s.memLRU.Remove(el)
			delete(s.mem, d)
		}
		if el, ok := s.disk[d]; ok {
			freed += s.dropLocked(el, "cache-remove")
		}
	}
	return freed
}

// Size returns the chunk bytes on disk: the bytes of chunk files and of
// packs, whose forgotten chunks count until the whole pack goes.
func (s *Store) Size() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.size
}

// Len returns the number of chunks on disk.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.disk)
}

// Stats returns the counters since Open.
func (s *Store) Stats() Stats {
	return Stats{
		MemoryHits: s.memoryHits.Load(),
		DiskHits:   s.diskHits.Load(),
		Misses:     s.misses.Load(),
		Evictions:  s.evictions.Load(),
		Corrupted:  s.corrupted.Load(),
		Fetches:    s.fetches.Load(),
	}
}

// Close cancels fetches in flight and waits for them. Stored chunks stay
// on disk for the next Open.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	s.openPacks.closeAll()
	return nil
}

// validDigest is d.Validate with a fast path for the common case, a
// sha256 digest in lowercase hex: Validate matches a regular expression,
// a microsecond per chunk, which was a sixth of the CPU of storing a run
// of small chunks.
func validDigest(d digest.Digest) error {
	if enc, ok := strings.CutPrefix(string(d), "sha256:"); ok && len(enc) == 64 {
		hex := true
		for i := 0; i < len(enc) && hex; i++ {
			c := enc[i]
			hex = '0' <= c && c <= '9' || 'a' <= c && c <= 'f'
		}
		if hex {
			return nil
		}
	}
	return d.Validate()
}
