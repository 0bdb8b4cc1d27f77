package fs

import (
	"cmp"
	"context"
	"errors"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"golang.org/x/time/rate"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/cache"
)

// The scheduler fetches, for every mounted layer, its prefetch list and
// then everything else, until the layer is complete and verified. Work is
// ranked on-demand > prefetch > background:
//
//   - on-demand reads (the filesystem's) take the host's foreground slots
//     (Concurrency), which background workers never hold, so a read never
//     queues behind background requests;
//   - background workers (BackgroundConcurrency per host) pick prefetch runs
//     of any layer before background runs (the layer furthest behind in its
//     list first); prefetch runs are large merged ranges (planPrefetch) and
//     share the link with on-demand reads, since both serve the startup;
//   - no background run starts while a prefetch or read-ahead run is in
//     flight to the host, and before each, workers wait while on-demand
//     requests are in flight to the same host (preemption between runs), so
//     background traffic steps aside for the startup;
//   - background runs are taken round-robin across the host's layers, so
//     no layer starves.
//
// Chunks already cached (by digest, whatever layer or image put them there)
// or being fetched by another worker are skipped: shared chunks are fetched
// once.

const (
	// fgQuiet is how long after an on-demand request ends background work
	// keeps waiting: reads come in bursts (a file read chunk after chunk).
	fgQuiet = 20 * time.Millisecond
	// fgMaxYield bounds one wait for on-demand traffic, so a steady stream
	// of reads slows background work down but cannot stop it.
	fgMaxYield = 2 * time.Second
	// maxBackoff bounds the pause of a layer whose fetches fail.
	maxBackoff = 30 * time.Second
)

// schedulerOptions configure a scheduler.
type schedulerOptions struct {
	fgConcurrency int   // on-demand requests per host
	bgConcurrency int   // background workers per host
	maxCoalesce   int64 // compressed bytes per background request
	background    bool  // fetch whole layers, not only prefetch lists
	rateLimit     int64 // background bytes per second, 0 unlimited
	pods          podWatchOptions
	cache         *cache.Store
	log           *logrus.Entry
}

// scheduler owns the background workers of every registry host.
type scheduler struct {
	opts    schedulerOptions
	limiter *rate.Limiter // nil when unlimited
	pods    *podWatch     // nil when background work does not watch the pods
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	mu    sync.Mutex
	hosts map[string]*hostPool
}

func newScheduler(opts schedulerOptions) *scheduler {
	s := &scheduler{opts: opts, hosts: map[string]*hostPool{}}
	if opts.pods.log == nil {
		opts.pods.log = opts.log
	}
	s.pods = newPodWatch(opts.pods)
	if opts.rateLimit > 0 {
		// The burst must hold the largest request waited for at once.
		s.limiter = rate.NewLimiter(rate.Limit(opts.rateLimit), int(max(opts.rateLimit, opts.maxCoalesce)))
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s
}

// pool returns the host's pool, starting its workers the first time.
func (s *scheduler) pool(host string) *hostPool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p, ok := s.hosts[host]; ok {
		return p
	}
	p := &hostPool{
		s:        s,
		host:     host,
		fgSem:    make(chan struct{}, s.opts.fgConcurrency),
		wake:     make(chan struct{}),
		inflight: map[digest.Digest]int{},
	}
	s.hosts[host] = p
	if s.ctx.Err() == nil {
		for range s.opts.bgConcurrency {
			s.wg.Go(p.work)
		}
	}
	return p
}

// close stops every worker and waits for them.
func (s *scheduler) close() {
	s.cancel()
	s.wg.Wait()
}

// hostPool is the work of one registry host.
type hostPool struct {
	s     *scheduler
	host  string
	fgSem chan struct{} // on-demand slots
	// fgActive counts on-demand requests in flight; fgLast is when the
	// last one ended (unix nanoseconds).
	fgActive atomic.Int32
	fgLast   atomic.Int64

	mu       sync.Mutex
	jobs     []*layerJob
	rr       int                   // next job for a background run
	inflight map[digest.Digest]int // chunks being fetched by workers
	// prefetching counts prefetch and read-ahead runs in flight: while
	// any runs, no background run starts, so the startup's bytes have
	// the link to themselves.
	prefetching int
	wake        chan struct{} // closed (and replaced) when work may be there
}

// foreground takes an on-demand slot; done gives it back.
func (p *hostPool) foreground(ctx context.Context) (done func(), err error) {
	p.fgActive.Add(1)
	select {
	case p.fgSem <- struct{}{}:
	case <-ctx.Done():
		p.fgEnd()
		return nil, ctx.Err()
	}
	return func() {
		<-p.fgSem
		p.fgEnd()
	}, nil
}

func (p *hostPool) fgEnd() {
	p.fgLast.Store(time.Now().UnixNano())
	p.fgActive.Add(-1)
}

// yield waits while on-demand requests run on this host, then while the
// node's pods are busy (podWatch), up to fgMaxYield in all.
func (p *hostPool) yield(ctx context.Context) {
	deadline := time.Now().Add(fgMaxYield)
	for time.Now().Before(deadline) {
		if p.fgActive.Load() == 0 && time.Since(time.Unix(0, p.fgLast.Load())) >= fgQuiet {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
	p.s.pods.wait(ctx, time.Until(deadline))
}

// notifyLocked wakes the workers.
func (p *hostPool) notifyLocked() {
	close(p.wake)
	p.wake = make(chan struct{})
}

func (p *hostPool) add(j *layerJob) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.jobs = append(p.jobs, j)
	p.notifyLocked()
}

func (p *hostPool) remove(j *layerJob) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, x := range p.jobs {
		if x == j {
			p.jobs = append(p.jobs[:i], p.jobs[i+1:]...)
			if p.rr > i {
				p.rr--
			}
			break
		}
	}
	p.notifyLocked()
}

// task is one unit of background work: a run of chunks [first, last) of a
// layer, or the completion check of a layer.
type task struct {
	job         *layerJob
	first, last int
	why         cause
	verify      bool
	// order ranks prefetch runs across layers: the run's place in its
	// layer's prefetch list, from 0 (first file) to 1.
	order float64
}

// work is a background worker's loop.
func (p *hostPool) work() {
	ctx := p.s.ctx
	th := lockWorkerThread()
	defer th.release()
	for {
		t, wake, wait := p.next()
		if t == nil {
			var timer <-chan time.Time
			if wait > 0 {
				timer = time.After(wait)
			}
			select {
			case <-ctx.Done():
				return
			case <-wake:
			case <-timer:
			}
			continue
		}
		th.setLow(t.verify || t.why == causeBackground)
		p.run(t, th)
	}
}

// next picks a task: the first queued prefetch run of any layer, else a
// background run of the next layer in turn. With none, it returns the
// channel to wait on and, when a layer is backing off, how long to wait.
func (p *hostPool) next() (*task, <-chan struct{}, time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	var wait time.Duration
	// Read-ahead first, newest first: it follows what is being read now.
	for _, j := range p.jobs {
		if j.stopped || len(j.ahead) == 0 || j.notBefore.After(now) {
			continue
		}
		t := j.ahead[len(j.ahead)-1]
		j.ahead = j.ahead[:len(j.ahead)-1]
		p.startLocked(t)
		return t, nil, 0
	}
	var pick *layerJob
	for _, j := range p.jobs {
		if j.stopped || len(j.prefetch) == 0 {
			continue
		}
		if d := j.notBefore.Sub(now); d > 0 {
			wait = minPositive(wait, d)
			continue
		}
		if pick == nil || j.prefetch[0].order < pick.prefetch[0].order {
			pick = j
		}
	}
	if pick != nil {
		t := pick.prefetch[0]
		pick.prefetch = pick.prefetch[1:]
		p.startLocked(t)
		return t, nil, 0
	}
	if p.prefetching > 0 {
		return nil, p.wake, wait
	}
	for k := range p.jobs {
		i := (p.rr + k) % len(p.jobs)
		j := p.jobs[i]
		if j.stopped || j.idle {
			continue
		}
		if d := j.notBefore.Sub(now); d > 0 {
			wait = minPositive(wait, d)
			continue
		}
		t := j.nextLocked(p)
		if t == nil {
			continue
		}
		p.rr = (i + 1) % len(p.jobs)
		p.startLocked(t)
		return t, nil, 0
	}
	return nil, p.wake, wait
}

func minPositive(a, b time.Duration) time.Duration {
	if a <= 0 || b < a {
		return b
	}
	return a
}

func (p *hostPool) startLocked(t *task) {
	if t.why == causePrefetch {
		p.prefetching++
	}
	t.job.running++
	t.job.wg.Add(1)
	if !t.verify {
		for _, c := range t.job.toc.Chunks[t.first:t.last] {
			p.inflight[c.Digest]++
		}
	}
}

func (p *hostPool) finish(t *task, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	j := t.job
	j.running--
	if t.why == causePrefetch {
		p.prefetching--
	}
	if !t.verify {
		for _, c := range j.toc.Chunks[t.first:t.last] {
			if p.inflight[c.Digest]--; p.inflight[c.Digest] <= 0 {
				delete(p.inflight, c.Digest)
			}
		}
	}
	switch {
	case err != nil && j.ctx.Err() == nil:
		j.failures++
		backoff := min(maxBackoff, time.Duration(float64(500*time.Millisecond)*math.Pow(2, float64(min(j.failures-1, 10)))))
		j.notBefore = time.Now().Add(backoff)
		j.log.WithError(err).WithFields(logrus.Fields{"op": "background", "retry_in": backoff}).Warn("background fetch failed; layer paused")
	case err == nil:
		j.failures = 0
	}
	j.wg.Done()
	p.notifyLocked()
}

// run performs t and reports it to its layer.
func (p *hostPool) run(t *task, th *workerThread) {
	j := t.job
	ctx := j.ctx
	if th.ok {
		ctx = onWorkerThread(ctx)
	}
	var err error
	if t.verify {
		err = j.complete(ctx, p)
	} else {
		err = p.fetch(ctx, t)
	}
	p.finish(t, err)
}

// fetch fetches the chunks of t that are not cached yet, in runs of back
// to back frames, after yielding to on-demand reads.
func (p *hostPool) fetch(ctx context.Context, t *task) error {
	j := t.job
	cs := j.toc.Chunks[t.first:t.last]
	var missing []int
	for i, c := range cs {
		if !p.s.opts.cache.Has(c.Digest) {
			missing = append(missing, i)
		}
	}
	for len(missing) > 0 {
		// One request for the missing chunks close together, the cached
		// ones between them fetched again: on a link of tens of
		// milliseconds a round trip costs more than a few hundred KiB,
		// and after a startup has read its scattered files the missing
		// chunks of a layer of small files alternate with cached ones.
		run := j.reader.nextRun(cs, missing, j.gap)
		missing = missing[len(run):]
		chunks := cs[run[0] : run[len(run)-1]+1]
		var n int64
		for _, c := range chunks {
			n += c.CompressedSize
		}
		rctx := ctx
		if t.why == causeBackground {
			// Prefetch runs serve the startup under way: they share the
			// link with its on-demand reads instead of waiting for them.
			rctx = p.s.pods.withBudget(ctx)
			p.yield(rctx)
		}
		if err := p.s.waitRate(ctx, n); err != nil {
			return err
		}
		if _, err := j.reader.fetchAndStore(rctx, chunks, t.why, false); err != nil {
			return err
		}
	}
	return nil
}

// waitRate waits until the rate limit allows n more bytes.
func (s *scheduler) waitRate(ctx context.Context, n int64) error {
	if s.limiter == nil {
		return nil
	}
	for n > 0 {
		k := min(n, int64(s.limiter.Burst()))
		if err := s.limiter.WaitN(ctx, int(k)); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// layerJob is the background work of one mounted layer. Fields below mu
// are guarded by the host pool's mu.
type layerJob struct {
	st     *layerState
	toc    *artifact.TOC
	reader *remoteReader
	log    *logrus.Entry
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // tasks in flight

	prefetch   []*task
	ahead      []*task // read-ahead runs, newest last (readAhead)
	aheadFrom  int     // chunks [aheadFrom, aheadEnd) were read or read ahead
	aheadEnd   int
	background bool
	cursor     int // next chunk a background run starts from
	running    int
	failures   int
	notBefore  time.Time
	stopped    bool
	idle       bool // nothing to do until the next mount
	passes     int  // completion checks that found chunks missing
	// gap is the most compressed bytes of chunks already cached (or in
	// flight) one request fetches again to join missing chunks on both
	// sides of them: the prefetch gap, up to maxBridge.
	gap int64
}

// newLayerJob plans the prefetch runs of a layer (see planPrefetch).
func newLayerJob(st *layerState, prefetch, background bool, maxCoalesce, gap int64) *layerJob {
	j := &layerJob{st: st, toc: st.toc, reader: st.reader, log: st.log, background: background, gap: min(gap, maxBridge)}
	j.ctx, j.cancel = context.WithCancel(context.Background())
	if !prefetch || len(j.toc.Prefetch) == 0 {
		return j
	}
	runs := planPrefetch(j.toc, maxCoalesce, gap)
	for _, r := range runs {
		j.prefetch = append(j.prefetch, &task{job: j, first: r.first, last: r.last, why: causePrefetch,
			order: float64(r.rank) / float64(len(j.toc.Prefetch))})
	}
	return j
}

// prefetchRun is a run of chunks [first, last) to prefetch; rank is the
// position in the prefetch list of the earliest file it serves.
type prefetchRun struct {
	first, last, rank int
}

// planPrefetch turns a layer's prefetch list into few, large range
// requests, for the chunks of each listed file, or of the parts of it the
// list gives (its startup read only those: the rest of a large file, a
// JVM's modules image, comes with the background fetch). A startup reads
// hundreds of small files one after another; fetched one request per
// file, that is one round trip per file, which costs more than the bytes
// over a link of tens of milliseconds. So the
// chunks of every listed file are taken in blob order and merged into runs
// of up to maxCoalesce compressed bytes, bridging gaps of up to gap bytes
// of unlisted chunks (bytes the background fetch would bring anyway; one
// round trip costs about as much as a bandwidth-delay product of bytes).
// Runs are then ordered by the earliest listed file each serves, so what
// the workload reads first arrives first.
func planPrefetch(toc *artifact.TOC, maxCoalesce, gap int64) []prefetchRun {
	byName := make(map[string]int, len(toc.Entries))
	for i, e := range toc.Entries {
		byName[e.Name] = i
	}
	rank := map[int]int{} // chunk index -> first list position needing it
	ranges := toc.PrefetchRangeMap()
	for pos, name := range toc.Prefetch {
		i, ok := byName[name]
		if !ok {
			continue
		}
		e := toc.Entries[i]
		if e.Type == artifact.TypeHardlink {
			if k, ok := byName[e.Linkname]; ok {
				e = toc.Entries[k]
			}
		}
		if e.Type != artifact.TypeReg || e.Size == 0 {
			continue
		}
		parts, ok := ranges[name]
		if !ok {
			parts = []artifact.Range{{Offset: 0, Size: e.Size}}
		}
		for _, r := range parts {
			first, last := toc.ChunkRange(e.Offset+r.Offset, r.Size)
			for c := first; c < last; c++ {
				if _, ok := rank[c]; !ok {
					rank[c] = pos
				}
			}
		}
	}
	wanted := make([]int, 0, len(rank))
	for c := range rank {
		wanted = append(wanted, c)
	}
	slices.Sort(wanted)
	var runs []prefetchRun
	end := func(c int) int64 { return toc.Chunks[c].CompressedOffset + toc.Chunks[c].CompressedSize }
	for _, c := range wanted {
		if n := len(runs); n > 0 {
			r := &runs[n-1]
			start := toc.Chunks[r.first].CompressedOffset
			if toc.Chunks[c].CompressedOffset-end(r.last-1) <= gap && end(c)-start <= maxCoalesce {
				r.last = c + 1
				r.rank = min(r.rank, rank[c])
				continue
			}
		}
		runs = append(runs, prefetchRun{first: c, last: c + 1, rank: rank[c]})
	}
	slices.SortStableFunc(runs, func(a, b prefetchRun) int { return a.rank - b.rank })
	return runs
}

// nextLocked returns the layer's next background task: a run of missing
// chunks from the cursor, or, when the cursor is at the end and nothing is
// in flight, its completion check.
func (j *layerJob) nextLocked(p *hostPool) *task {
	chunks := j.toc.Chunks
	if j.background {
		// A run starts at the first chunk neither cached nor in flight
		// and takes the missing chunks after it, bridging up to j.gap
		// compressed bytes of chunks it does not need (see fetch).
		start, end := -1, -1
		var gap int64
		for ; j.cursor < len(chunks); j.cursor++ {
			c := chunks[j.cursor]
			skip := p.inflight[c.Digest] > 0 || p.s.opts.cache.Has(c.Digest)
			if start < 0 {
				if !skip {
					start, end = j.cursor, j.cursor+1
				}
				continue
			}
			prev := chunks[j.cursor-1]
			if prev.CompressedOffset+prev.CompressedSize != c.CompressedOffset ||
				c.CompressedOffset+c.CompressedSize-chunks[start].CompressedOffset > p.s.opts.maxCoalesce {
				break
			}
			if skip {
				if gap += c.CompressedSize; gap > j.gap {
					break
				}
				continue
			}
			gap, end = 0, j.cursor+1
		}
		if start >= 0 {
			j.cursor = end
			return &task{job: j, first: start, last: end, why: causeBackground}
		}
	}
	if j.running > 0 || len(j.prefetch) > 0 || len(j.ahead) > 0 {
		return nil
	}
	j.idle = true // until the check below says otherwise
	return &task{job: j, verify: true}
}

// maxBridge bounds the cached bytes a background or read-ahead request
// fetches again to join missing chunks: enough to merge the small files a
// startup left behind between the ones it read (a few KiB each, one round
// trip apiece otherwise), not so much that a run re-fetches whole files
// the prefetch brought, whose round trips the concurrent workers hide.
const maxBridge = 64 << 10

// maxAhead bounds the read-ahead runs queued per layer: past it the oldest
// is dropped, the workload having moved on.
const maxAhead = 4

// readAhead queues the fetch of up to n compressed bytes of chunks after
// c, an on-demand fetch's last chunk, continuing the window of the
// previous read-ahead when c falls in it (as the kernel's read-ahead does
// for a file, here across the files laid out next to each other).
func (j *layerJob) readAhead(p *hostPool, c artifact.Chunk, n int64) {
	chunks := j.toc.Chunks
	i, found := slices.BinarySearchFunc(chunks, c.CompressedOffset, func(x artifact.Chunk, off int64) int {
		return cmp.Compare(x.CompressedOffset, off)
	})
	if !found {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if j.stopped {
		return
	}
	start := i + 1
	if i >= j.aheadFrom && i < j.aheadEnd {
		start = max(start, j.aheadEnd)
	}
	limit := chunks[i].CompressedOffset + chunks[i].CompressedSize + n
	end := start
	for end < len(chunks) && chunks[end].CompressedOffset+chunks[end].CompressedSize <= limit {
		end++
	}
	if end <= start {
		return
	}
	j.aheadFrom, j.aheadEnd = i, end
	if len(j.ahead) == maxAhead {
		j.ahead = append(j.ahead[:0], j.ahead[1:]...)
	}
	j.ahead = append(j.ahead, &task{job: j, first: start, last: end, why: causePrefetch})
	p.notifyLocked()
}

// stop cancels the layer's work and waits for its tasks to end.
func (j *layerJob) stop(p *hostPool) {
	p.mu.Lock()
	j.stopped = true
	p.mu.Unlock()
	j.cancel()
	p.remove(j)
	j.wg.Wait()
}

// complete is the completion check: when every chunk of the layer is
// cached, it verifies the layer; when some are missing and background
// fetch is on, it sends the cursor round again.
func (j *layerJob) complete(ctx context.Context, p *hostPool) error {
	if j.toc.TarSize > podCheapCheck {
		ctx = p.s.pods.withBudget(ctx)
		p.s.pods.wait(ctx, fgMaxYield)
	}
	release, err := takeBackgroundCPU(ctx)
	if err != nil {
		return nil // the layer is going away
	}
	err = j.st.verify(ctx)
	release()
	if errors.Is(err, errChunksMissing) {
		var missing []int
		if j.background {
			// Asked of the cache before taking the pool's lock, which
			// on-demand reads take to queue their read-ahead.
			for i, c := range j.toc.Chunks {
				if !p.s.opts.cache.Has(c.Digest) {
					missing = append(missing, i)
				}
			}
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		if j.background {
			j.passes++
			j.logMissingLocked(p, missing)
			j.cursor = 0
			j.idle = false
			if j.passes > 1 {
				// Chunks went missing after a full pass (evicted, or a
				// fetch failed): pause before going round again.
				j.notBefore = time.Now().Add(min(maxBackoff, time.Duration(j.passes)*time.Second))
			}
		}
		return nil
	}
	return err
}

// logMissingLocked says which chunks a completion check found missing
// and whether a fetch of them is in flight.
func (j *layerJob) logMissingLocked(p *hostPool, missing []int) {
	inflight := 0
	for _, i := range missing {
		if p.inflight[j.toc.Chunks[i].Digest] > 0 {
			inflight++
		}
	}
	j.log.WithFields(logrus.Fields{"op": "verify", "pass": j.passes, "missing": len(missing), "inflight": inflight, "first": missing[:min(len(missing), 5)], "running": j.running}).Info("completion check: chunks missing")
}

// rateWindow measures a rate over the last rateSpan.
type rateWindow struct {
	mu      sync.Mutex
	samples []rateSample
}

type rateSample struct {
	at time.Time
	n  int64
}

const rateSpan = 10 * time.Second

func (w *rateWindow) add(at time.Time, n int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.pruneLocked(at)
	w.samples = append(w.samples, rateSample{at, n})
}

func (w *rateWindow) pruneLocked(now time.Time) {
	i := 0
	for i < len(w.samples) && now.Sub(w.samples[i].at) > rateSpan {
		i++
	}
	w.samples = append(w.samples[:0], w.samples[i:]...)
}

// perSecond is the bytes per second of the last rateSpan.
func (w *rateWindow) perSecond(now time.Time) float64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.pruneLocked(now)
	var n int64
	for _, s := range w.samples {
		n += s.n
	}
	return float64(n) / rateSpan.Seconds()
}

// latencyBuckets are the upper bounds (seconds) of the range request
// latency histogram.
var latencyBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// histogram is a lock-free fixed-bucket histogram. Its bounds (seconds,
// at most len(counts)-1 of them) are the caller's: latencyBuckets for
// observe and snapshot.
type histogram struct {
	counts [16]atomic.Uint64 // the one after the last bound is +Inf
	sumNs  atomic.Int64
}

func (h *histogram) observe(d time.Duration) { h.observeIn(latencyBuckets, d) }

func (h *histogram) observeIn(bounds []float64, d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(bounds) && s > bounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNs.Add(int64(d))
}

// Histogram is a snapshot of a latency histogram: Counts[i] observations
// fell at or below Bounds[i] (seconds) and above the bound before, the
// last count above every bound.
type Histogram struct {
	Bounds []float64
	Counts []uint64
	Sum    float64 // seconds
}

// Count is the number of observations.
func (h Histogram) Count() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}

func (h *histogram) snapshot() Histogram { return h.snapshotIn(latencyBuckets) }

func (h *histogram) snapshotIn(bounds []float64) Histogram {
	out := Histogram{Bounds: bounds, Counts: make([]uint64, len(bounds)+1), Sum: time.Duration(h.sumNs.Load()).Seconds()}
	for i := range out.Counts {
		out.Counts[i] = h.counts[i].Load()
	}
	return out
}
