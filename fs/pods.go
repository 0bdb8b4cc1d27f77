package fs

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Background work gives way to the node's containers. A container that has
// just started serves its first requests while the rest of its image is
// still arriving; on a small node the fetch (the kernel receiving it, the
// daemon decompressing, hashing and writing it) takes CPU those requests
// need, and they come out several times slower than on a pulled image.
// So the scheduler watches the CPU time of the cgroup that holds the pods
// (kubelet's kubepods.slice or kubepods) and holds background requests
// and the decoding of background runs back:
//
//   - while the last sample (10 ms) shows the pods using more than a share
//     of the node's CPUs: requests to a running container stop the
//     background fetch within a sample;
//   - while their average use (exponential, over the window, 1 s) is above
//     that share: after a busy startup it stays up for a moment, which
//     covers the first requests right after readiness, while a short burst
//     of a busy node barely moves it;
//   - for 50 ms after a sample over the share, while their average is
//     over half of it: a startup of a second does not lift the average
//     over the share, and a service's first requests leave samples under
//     it between them (a burst on a quiet node still holds nothing back).
//
// A run already under way when the pods get busy pauses between its
// chunks (decoding, hashing, writing) while the last sample shows them
// busy: writing a run of small files' chunks costs tens of milliseconds
// of CPU, as long as the requests it would slow.
//
// Busy pods slow the background fetch down but never stop it: the waits
// of a run end once the pods have been busy for podBusyCap of them (a
// startup that keeps the CPU busy for seconds still lets each worker make
// a run every half second; the budget is whole again once the pods were
// seen idle), and each after the caller's limit in any case (fgMaxYield).
// Runs whose budget is spent work between their pauses, all of them
// together, for about a third of a CPU while the pods stay busy
// (podDutyRatio), as do all runs while they were busy recently.
// The check of a layer of less than a MiB does not wait.
// Prefetch and read-ahead runs never wait: they serve the startup itself.

const (
	// podSample is the shortest time between two samples of the pods'
	// CPU time; their use is the difference over it.
	podSample = 10 * time.Millisecond
	// podRecent is how long the pods count as busy after a sample over
	// their share, while their average is over half of it: a service's
	// first requests, a few milliseconds each with the client's turn
	// between them, leave some 10 ms samples under the share, and a
	// startup of a second or two does not lift the average over it.
	podRecent = 50 * time.Millisecond
	// podStale is how old a sample may be and still be the start of the
	// next difference: older, a fresh pair is taken.
	podStale = 200 * time.Millisecond
	// podFind is how often a cgroup not found yet is looked for again
	// (kubelet creates it when it starts).
	podFind = 5 * time.Second
	// podBusyCap is how long the pods may be seen busy during the waits
	// of one background run, or of a layer's check, before they end
	// anyway: busy pods leave each worker a run every half second.
	podBusyCap = 500 * time.Millisecond
	// podPauseStep is how long a pause inside a run sleeps before it
	// looks at the pods again.
	podPauseStep = 2 * time.Millisecond
	// podIdleSamples idle samples in a row make the pods idle again for
	// the budgets of runs: a startup waiting a moment on a read does
	// not give every run its budget back.
	podIdleSamples = 2
	// podDutyRatio and podDutyMax: once a run has spent its budget, each
	// pause while the pods are busy lasts podDutyRatio times the work
	// since the run's last pause, at most podDutyMax (see podPause).
	podDutyRatio = 3
	podDutyMax   = 30 * time.Millisecond
	// podCheapCheck is the largest layer whose check does not wait: it
	// hashes in about a millisecond.
	podCheapCheck = 1 << 20
)

// podWatchOptions configure a podWatch.
type podWatchOptions struct {
	// cgroups are the names (or absolute paths) of the cgroup to watch,
	// the first found being used; none disables the watch.
	cgroups []string
	// root is where cgroup filesystems are mounted ("/sys/fs/cgroup").
	root string
	// share is the fraction of the node's CPUs the pods may use before
	// background work waits; 0 disables the watch.
	share float64
	// window is the time constant of the pods' average CPU use.
	window time.Duration
	cpus   int
	log    *logrus.Entry
	// read reads a usage file (readUsage); tests replace it.
	read func(path string, v2 bool) (time.Duration, error)
}

// podWatch samples the CPU time of the pods' cgroup.
type podWatch struct {
	opts podWatchOptions

	mu        sync.Mutex
	file      string // the cgroup's usage file, "" until found
	v2        bool   // file is cpu.stat (usage_usec), else cpuacct.usage (ns)
	findAt    time.Time
	sampledAt time.Time
	usage     time.Duration
	now       bool      // the last sample was over the share
	busyAt    time.Time // when the last sample over the share was taken
	average   float64   // CPUs, exponential over opts.window

	waited atomic.Int64 // nanoseconds background work waited for the pods

	// dutyAt is when the pauses of runs whose budget is spent end, all
	// runs' pauses laid end to end (podPause): their share of the CPU is
	// the node's, not each run's.
	dutyMu sync.Mutex
	dutyAt time.Time
	idle   atomic.Int64 // stretches of podIdleSamples idle samples seen
	idleN  int          // idle samples in a row
}

// newPodWatch returns nil when the options disable the watch.
func newPodWatch(o podWatchOptions) *podWatch {
	if len(o.cgroups) == 0 || o.share <= 0 {
		return nil
	}
	if o.root == "" {
		o.root = "/sys/fs/cgroup"
	}
	if o.cpus <= 0 {
		o.cpus = runtime.NumCPU()
	}
	if o.window <= 0 {
		o.window = time.Second
	}
	if o.log == nil {
		o.log = logrus.NewEntry(logrus.StandardLogger())
	}
	if o.read == nil {
		o.read = readUsage
	}
	return &podWatch{opts: o}
}

// findLocked looks for the first of the configured cgroups, in the
// cgroup v1 cpuacct hierarchy or the unified (v2) one.
func (w *podWatch) findLocked(now time.Time) {
	if w.file != "" || now.Sub(w.findAt) < podFind && !w.findAt.IsZero() {
		return
	}
	w.findAt = now
	for _, name := range w.opts.cgroups {
		var dirs []string
		if filepath.IsAbs(name) {
			dirs = []string{name}
		} else {
			dirs = []string{
				filepath.Join(w.opts.root, "cpuacct", name),
				filepath.Join(w.opts.root, "cpu,cpuacct", name),
				filepath.Join(w.opts.root, name),
			}
		}
		for _, d := range dirs {
			for _, f := range []struct {
				name string
				v2   bool
			}{{"cpuacct.usage", false}, {"cpu.stat", true}} {
				p := filepath.Join(d, f.name)
				if _, err := w.opts.read(p, f.v2); err == nil {
					w.file, w.v2 = p, f.v2
					w.opts.log.WithFields(logrus.Fields{"op": "background", "cgroup": d}).Info("background fetch gives way to the CPU use of this cgroup")
					return
				}
			}
		}
	}
}

// readUsage reads the cumulative CPU time of a cgroup from its
// cpuacct.usage (v1, nanoseconds) or cpu.stat (v2, usage_usec).
func readUsage(path string, v2 bool) (time.Duration, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	if !v2 {
		n, err := strconv.ParseInt(string(bytes.TrimSpace(b)), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("read CPU time of %s: %w", path, err)
		}
		return time.Duration(n), nil
	}
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("usage_usec ")); ok {
			n, err := strconv.ParseInt(string(bytes.TrimSpace(v)), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("read CPU time of %s: %w", path, err)
			}
			return time.Duration(n) * time.Microsecond, nil
		}
	}
	return 0, fmt.Errorf("read CPU time of %s: no usage_usec", path)
}

// busy samples the pods' CPU time (at most once per podSample) and
// reports whether they were over their share of the node's CPUs in the
// last sample (now) and whether background work should wait (hold: now,
// or their average is over it). A sample too old to start a difference
// from is followed by another after podSample.
func (w *podWatch) busy(ctx context.Context) (now, hold bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	at := time.Now()
	w.findLocked(at)
	if w.file == "" {
		return false, false
	}
	if at.Sub(w.sampledAt) >= podSample {
		if at.Sub(w.sampledAt) > podStale {
			// The average takes the whole gap at its mean rate; the
			// last sample needs a short interval of its own.
			if !w.sampleLocked(at) {
				return false, false
			}
			select {
			case <-ctx.Done():
				return false, false
			case <-time.After(podSample):
			}
			at = time.Now()
		}
		if !w.sampleLocked(at) {
			return false, false
		}
	}
	return w.stateLocked()
}

// stateLocked is busy's answer from the samples taken.
func (w *podWatch) stateLocked() (now, hold bool) {
	recent := w.sampledAt.Sub(w.busyAt) < podRecent && w.over(2*w.average)
	return w.now, w.now || w.over(w.average) || recent
}

// over reports whether the pods using cpus CPUs are over their share of
// the node's.
func (w *podWatch) over(cpus float64) bool {
	return cpus > w.opts.share*float64(w.opts.cpus)
}

// sampleLocked reads the usage; a cgroup gone is looked for again.
func (w *podWatch) sampleLocked(now time.Time) bool {
	u, err := w.opts.read(w.file, w.v2)
	if err != nil {
		w.opts.log.WithError(err).WithField("op", "background").Warn("cannot read the pods' CPU time; background fetch no longer gives way to them until the cgroup is found again")
		w.file, w.findAt, w.sampledAt = "", now, time.Time{}
		w.now, w.average = false, 0
		return false
	}
	if !w.sampledAt.IsZero() {
		dt := now.Sub(w.sampledAt)
		cpus := float64(u-w.usage) / float64(dt)
		w.now = w.over(cpus)
		if w.now {
			w.busyAt = now
		}
		if w.idleN++; w.now {
			w.idleN = 0
		} else if w.idleN == podIdleSamples {
			w.idle.Add(1)
		}
		w.average += (1 - math.Exp(-float64(dt)/float64(w.opts.window))) * (cpus - w.average)
	}
	w.sampledAt, w.usage = now, u
	return true
}

// podBudget is how long the pods may still be seen busy in the waits and
// pauses of one run, or of one layer's check (it waits before its request
// and before its decoding, and pauses between its chunks, against one
// budget). The budget is whole again once the watch has seen the pods
// idle (podIdleSamples in a row) since it was last drawn on: a run that
// spent it during a busy startup still gives way to the first requests
// after it.
type podBudget struct {
	w    *podWatch
	left time.Duration
	idle int64 // the watch's idle stretches when the budget was last drawn on
	// worked is when the run last came out of podPause: the work since
	// then sets the next pause once the budget is spent.
	worked time.Time
	// On a worker's locked thread (onWorkerThread), the work is the
	// thread's CPU time since workedCPU: a run reading a range off the
	// socket spends most of its time waiting for the link, which is
	// not work to pay for with a pause.
	threadCPU bool
	workedCPU time.Duration
	// For the run's debug log line: how long the run waited for the pods
	// in all, its pauses for a share of its work, their time, and the
	// work they were for.
	dutyPauses                  int
	waited, dutyWaited, dutyFor time.Duration
}

// budgetLog returns the fields of the budget in ctx for a log line.
func budgetLog(ctx context.Context) logrus.Fields {
	b, ok := ctx.Value(podBudgetKey{}).(*podBudget)
	if !ok {
		return nil
	}
	return logrus.Fields{"duty_pauses": b.dutyPauses, "waited_ms": b.waited.Milliseconds(),
		"duty_waited_ms": b.dutyWaited.Milliseconds(), "duty_for_ms": b.dutyFor.Milliseconds(), "budget_left_ms": b.left.Milliseconds()}
}

type workerThreadKey struct{}

// onWorkerThread marks ctx as used by a goroutine locked to its thread
// (lockWorkerThread) for as long as ctx is: the thread's CPU time is the
// goroutine's.
func onWorkerThread(ctx context.Context) context.Context {
	return context.WithValue(ctx, workerThreadKey{}, true)
}

// threadCPUTime is the calling thread's CPU time, 0 when not known.
func threadCPUTime() time.Duration {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts) != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// work is what the run did since it last came out of podPause.
func (b *podBudget) work() time.Duration {
	if b.threadCPU {
		return threadCPUTime() - b.workedCPU
	}
	return time.Since(b.worked)
}

// markWorked starts counting the run's work anew.
func (b *podBudget) markWorked() {
	b.worked = time.Now()
	if b.threadCPU {
		b.workedCPU = threadCPUTime()
	}
}

type podBudgetKey struct{}

// withBudget returns ctx carrying a fresh budget for the waits and pauses
// of one run (ctx itself when the watch is off).
func (w *podWatch) withBudget(ctx context.Context) context.Context {
	if w == nil {
		return ctx
	}
	b := w.newBudget()
	b.threadCPU = ctx.Value(workerThreadKey{}) != nil
	return context.WithValue(ctx, podBudgetKey{}, b)
}

// newBudget is a whole budget, as of the idle stretches seen so far.
func (w *podWatch) newBudget() *podBudget {
	return &podBudget{w: w, left: podBusyCap, idle: w.idle.Load()}
}

// remaining is what is left of b, whole again when the pods were seen
// idle since it was last drawn on.
func (b *podBudget) remaining() time.Duration {
	if idle := b.w.idle.Load(); idle != b.idle {
		b.idle, b.left = idle, podBusyCap
	}
	return b.left
}

// draw takes d of busy pods from b.
func (b *podBudget) draw(d time.Duration) {
	b.remaining()
	b.left -= d
}

// wait returns once background work need not wait for the pods, or once
// they have been seen busy for the budget in ctx (withBudget; with none, a
// fresh one), or after limit, or when ctx ends.
func (w *podWatch) wait(ctx context.Context, limit time.Duration) {
	if w == nil {
		return
	}
	b, ok := ctx.Value(podBudgetKey{}).(*podBudget)
	if !ok {
		b = w.newBudget()
	}
	start := time.Now()
	for last := start; time.Since(start) < limit && b.remaining() > 0; {
		now, hold := w.busy(ctx)
		if !hold {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Millisecond):
		}
		at := time.Now()
		w.waited.Add(int64(at.Sub(last)))
		b.waited += at.Sub(last)
		if now {
			b.draw(at.Sub(last))
		}
		last = at
	}
}

// podPause is called inside a background run's CPU work, between steps of
// reading its range off the socket, between its chunks (decoding, hashing,
// writing them), and inside a layer's check: a
// run that was under way when the pods got busy stops within a sample,
// rather than finishing tens of milliseconds of work meanwhile. It waits
// while the last sample shows the pods busy, against the budget in ctx
// (withBudget), and returns at once when ctx carries none.
//
// Once the budget is spent, a run still gives way while the pods are
// busy, by a share of its time rather than all of it: it pauses for
// podDutyRatio times the work it did since its last pause (CPU time on a
// worker's thread, else time; at most
// podDutyMax), after the pauses other runs booked before it (dutyAfter),
// so that background runs together take about a third of a CPU at most
// beside busy pods, in stretches of one chunk's work; a pause ends early
// once the pods are no longer busy. It does so too while the
// pods were busy recently (their average over the share) though not in
// the last sample: right after a startup, when a service gets its first
// requests, a sample shows them only up to podSample late. Decoding,
// hashing and writing run several times faster than any registry link
// delivers, so the link stays busy and completion barely moves; a
// request arriving meanwhile finds a background run holding a CPU for a
// chunk's millisecond or two at most, not for the rest of the run.
func podPause(ctx context.Context) {
	b, ok := ctx.Value(podBudgetKey{}).(*podBudget)
	if !ok {
		return
	}
	work := b.work() // since the last pause, not counting this one's waits
	defer b.markWorked()
	now, hold := b.w.busy(ctx)
	for now && b.remaining() > 0 {
		start := time.Now()
		select {
		case <-ctx.Done():
			return
		case <-time.After(podPauseStep):
		}
		d := time.Since(start)
		b.w.waited.Add(int64(d))
		b.waited += d
		b.draw(d)
		now, hold = b.w.busy(ctx)
	}
	if b.worked.IsZero() || !hold {
		return
	}
	b.dutyPauses++
	b.dutyFor += work
	dutyStart := time.Now()
	defer func() { b.dutyWaited += time.Since(dutyStart); b.waited += time.Since(dutyStart) }()
	until := b.w.dutyAfter(time.Now(), min(podDutyRatio*work, podDutyMax))
	for {
		d := time.Until(until)
		if d <= 0 {
			return
		}
		start := time.Now()
		select {
		case <-ctx.Done():
			return
		case <-time.After(min(d, 5*time.Millisecond)):
		}
		b.w.waited.Add(int64(time.Since(start)))
		if _, hold = b.w.busy(ctx); !hold {
			b.w.dutyReset()
			return
		}
	}
}

// dutyAfter books a pause of d for a run that worked until now, after the
// pauses already booked by other runs, and returns when it ends. Laid end
// to end, the pauses keep all background runs together to about
// 1/podDutyRatio of a CPU, however many there are (fetch.
// background_concurrency of them per registry host, several hosts): each
// run's own ratio would let four runs take a whole CPU.
func (w *podWatch) dutyAfter(now time.Time, d time.Duration) time.Time {
	w.dutyMu.Lock()
	defer w.dutyMu.Unlock()
	if w.dutyAt.Before(now) {
		w.dutyAt = now
	}
	w.dutyAt = w.dutyAt.Add(d)
	return w.dutyAt
}

// dutyReset forgets the booked pauses once the pods are no longer busy.
func (w *podWatch) dutyReset() {
	w.dutyMu.Lock()
	w.dutyAt = time.Time{}
	w.dutyMu.Unlock()
}

// waitedFor is how long background work has waited for the pods, summed
// over the goroutines that waited.
func (w *podWatch) waitedFor() time.Duration {
	if w == nil {
		return 0
	}
	return time.Duration(w.waited.Load())
}
