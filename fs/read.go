package fs

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/artifact"
)

// read serves bytes [off, off+len(dest)) of f, fetching only the chunks
// they lie in. Errors become EIO here, at the FUSE edge (EINTR when the
// kernel interrupted the request).
func (l *layer) read(ctx context.Context, f *fileNode, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	var pid uint32
	if c, ok := fuse.FromContext(ctx); ok {
		pid = c.Pid
	}
	return l.readFile(ctx, pid, f.offset, f.size, f.name, dest, off)
}

// readFile serves bytes [off, off+len(dest)) of the file whose data lies at
// tar offset offset and has size bytes, for process pid; name is for logs.
func (l *layer) readFile(ctx context.Context, pid uint32, offset, size int64, name string, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= size || len(dest) == 0 {
		return fuse.ReadResultData(nil), 0
	}
	n := min(int64(len(dest)), size-off)
	data, first, err := l.readRange(ctx, pid, offset+off, n, dest)
	if err != nil {
		l.errors.Add(1)
		errno := syscall.EIO
		if errors.Is(err, context.Canceled) && ctx.Err() != nil {
			errno = syscall.EINTR
		}
		l.log.WithError(err).WithFields(logrus.Fields{
			"op": "read", "file": name, "offset": off, "size": n, "chunk": first,
		}).Warn("read failed")
		return nil, errno
	}
	l.reads.Add(1)
	l.bytes.Add(n)
	return fuse.ReadResultData(data), 0
}

// readRange returns the tar bytes [off, off+n), bounded in time by
// ReadTimeout. A range within one chunk is returned as a slice of that
// chunk; a range across chunks is assembled in dest. It also returns the
// index of the first chunk, for logs. A read of pid that failed within
// failureMemory fails again at once (see failures).
func (l *layer) readRange(ctx context.Context, pid uint32, off, n int64, dest []byte) ([]byte, int, error) {
	first, last := l.toc.ChunkRange(off, n)
	if first >= last {
		return nil, first, fmt.Errorf("read tar bytes [%d, %d) of layer %s: no chunk holds them", off, off+n, l.toc.Layer)
	}
	cs := l.toc.Chunks[first:last]
	if end := cs[len(cs)-1].Offset + cs[len(cs)-1].Size; cs[0].Offset > off || end < off+n {
		return nil, first, fmt.Errorf("read tar bytes [%d, %d) of layer %s: chunks %d-%d cover only [%d, %d)",
			off, off+n, l.toc.Layer, first, last-1, cs[0].Offset, end)
	}

	if err := l.failures.recent(pid, first, last); err != nil {
		return nil, first, err
	}
	callerCtx := ctx
	ctx, cancel := context.WithTimeout(ctx, l.opts.ReadTimeout)
	defer cancel()
	datas, err := l.fetch(ctx, first, cs)
	if err != nil {
		if callerCtx.Err() == nil {
			l.failures.remember(pid, first, last, err)
		}
		return nil, first, err
	}
	for i, c := range cs {
		if int64(len(datas[i])) != c.Size {
			return nil, first, fmt.Errorf("read chunk %d of layer %s: got %d bytes, want %d", first+i, l.toc.Layer, len(datas[i]), c.Size)
		}
	}
	if len(cs) == 1 {
		s := off - cs[0].Offset
		return datas[0][s : s+n], first, nil
	}
	pos, w := off, int64(0)
	for i, c := range cs {
		if pos < c.Offset || pos >= c.Offset+c.Size {
			return nil, first, fmt.Errorf("read chunk %d of layer %s: chunks are not contiguous at tar offset %d", first+i, l.toc.Layer, pos)
		}
		k := int64(copy(dest[w:n], datas[i][pos-c.Offset:]))
		w += k
		pos += k
		if w == n {
			break
		}
	}
	return dest[:n], first, nil
}

// fetch gets the chunks cs (whose first index is first) and returns when
// they are there or ctx is done, whichever comes first: a reader that
// ignores ctx cannot hold a read past its deadline.
func (l *layer) fetch(ctx context.Context, first int, cs []artifact.Chunk) ([][]byte, error) {
	type result struct {
		datas [][]byte
		err   error
	}
	done := make(chan result, 1)
	go func() {
		datas, err := l.fetchChunks(ctx, first, cs)
		done <- result{datas, err}
	}()
	select {
	case r := <-done:
		return r.datas, r.err
	case <-ctx.Done():
		return nil, fmt.Errorf("read chunks %d-%d of layer %s: %w", first, first+len(cs)-1, l.toc.Layer, ctx.Err())
	}
}

// fetchChunks reads cs in one request when the reader can coalesce, else
// one request per chunk, in parallel.
func (l *layer) fetchChunks(ctx context.Context, first int, cs []artifact.Chunk) ([][]byte, error) {
	if len(cs) > 1 && l.multi != nil {
		datas, err := l.multi.ReadChunks(ctx, cs)
		if err != nil {
			return nil, fmt.Errorf("read chunks %d-%d of layer %s: %w", first, first+len(cs)-1, l.toc.Layer, err)
		}
		if len(datas) != len(cs) {
			return nil, fmt.Errorf("read chunks %d-%d of layer %s: got %d chunks, want %d", first, first+len(cs)-1, l.toc.Layer, len(datas), len(cs))
		}
		return datas, nil
	}
	datas := make([][]byte, len(cs))
	if len(cs) == 1 {
		d, err := l.reader.ReadChunk(ctx, cs[0])
		if err != nil {
			return nil, fmt.Errorf("read chunk %d of layer %s: %w", first, l.toc.Layer, err)
		}
		datas[0] = d
		return datas, nil
	}
	errs := make([]error, len(cs))
	var wg sync.WaitGroup
	for i := range cs {
		wg.Go(func() {
			d, err := l.reader.ReadChunk(ctx, cs[i])
			if err != nil {
				errs[i] = fmt.Errorf("read chunk %d of layer %s: %w", first+i, l.toc.Layer, err)
			}
			datas[i] = d
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return datas, nil
}

// failureMemory is how long a failed read is remembered for the process
// that made it.
const failureMemory = time.Second

// failures remembers recent failed reads per process and chunk. When a
// read through the page cache fails, the kernel sends it to the server
// again (readahead, then the page, then once more) before the process
// sees EIO; without this, a stalled registry would hold the reader for
// several read timeouts instead of one. Another process, or the same one
// a second later, tries the registry again.
type failures struct {
	mu sync.Mutex
	m  map[failureKey]failure
}

type failureKey struct {
	pid   uint32
	chunk int
}

type failure struct {
	at  time.Time
	err error
}

// recent returns the remembered error of pid's read of any chunk in
// [first, last), or nil.
func (f *failures) recent(pid uint32, first, last int) error {
	if pid == 0 {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	for c := first; c < last; c++ {
		if r, ok := f.m[failureKey{pid, c}]; ok && now.Sub(r.at) < failureMemory {
			return fmt.Errorf("chunk %d failed %v ago for this process; not tried again for %v: %w",
				c, now.Sub(r.at).Round(time.Millisecond), failureMemory, r.err)
		}
	}
	return nil
}

// remember records that pid's read of chunks [first, last) failed.
func (f *failures) remember(pid uint32, first, last int, err error) {
	if pid == 0 {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	if f.m == nil {
		f.m = map[failureKey]failure{}
	}
	if len(f.m) > 4096 {
		for k, r := range f.m {
			if now.Sub(r.at) >= failureMemory {
				delete(f.m, k)
			}
		}
	}
	for c := first; c < last; c++ {
		f.m[failureKey{pid, c}] = failure{now, err}
	}
}
