package fs

import (
	"context"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// Background work (fetching the rest of every layer and checking it
// against its diffID) decompresses and hashes hundreds of MiB, on the
// same CPUs the node's containers need right after they start: their
// first requests would wait for it. So each background worker runs on a
// thread of its own (Go creates new threads from a clean one, never by
// cloning a locked thread, so nothing else inherits its priority) whose
// nice value is raised for background runs and the completion check and
// set back for prefetch and read-ahead runs, which serve a startup under
// way. Lowering a nice value again needs CAP_SYS_NICE (the snapshotter
// runs as root); without it, workers keep the daemon's priority.
//
// A locked thread is never left to end with its goroutine: the thread is
// given back, at the daemon's priority, to the runtime. A child process
// started with a parent-death signal (Pdeathsig) gets it when the thread
// that forked it ends, not the process, and any thread may have forked
// one.

// backgroundNice is the nice value of a worker thread during background
// work: it gets about a tenth of a CPU a busy normal thread would leave
// it, and all it wants of an idle one.
const backgroundNice = 10

// backgroundCPU holds a slot per goroutine doing background CPU work
// (decompressing, hashing and writing a background run, a completion
// check): one fewer than GOMAXPROCS, at least one. The worker's thread
// runs at backgroundNice, but Go's scheduler does not know it: background
// goroutines busy on every P would leave the handlers of FUSE requests (a
// starting container's reads) runnable with no P to run on until the
// runtime preempts one, up to 10 ms later.
var backgroundCPU = make(chan struct{}, max(1, runtime.GOMAXPROCS(0)-1))

// takeBackgroundCPU waits for a backgroundCPU slot; release gives it back.
func takeBackgroundCPU(ctx context.Context) (release func(), err error) {
	select {
	case backgroundCPU <- struct{}{}:
		return func() { <-backgroundCPU }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

var (
	niceOnce sync.Once
	niceOK   bool
)

// canRenice reports whether this process can raise a thread's nice value
// and set it back: it tries once, on a thread of its own.
func canRenice() bool {
	niceOnce.Do(func() {
		done := make(chan bool)
		go func() {
			runtime.LockOSThread()
			tid := unix.Gettid()
			ok := unix.Setpriority(unix.PRIO_PROCESS, tid, backgroundNice) == nil &&
				unix.Setpriority(unix.PRIO_PROCESS, tid, 0) == nil
			// Given back even if its nice value stayed raised: a slow
			// thread is a smaller harm than a child's parent-death
			// signal.
			runtime.UnlockOSThread()
			done <- ok
		}()
		niceOK = <-done
	})
	return niceOK
}

// workerThread is the thread of a background worker; the worker must be
// locked to it (lockWorkerThread).
type workerThread struct {
	tid  int
	nice int
	ok   bool
}

// lockWorkerThread locks the calling goroutine to its thread and returns
// the thread, whose nice value setLow changes; the worker must call
// release before it returns.
func lockWorkerThread() *workerThread {
	if !canRenice() {
		return &workerThread{}
	}
	runtime.LockOSThread()
	return &workerThread{tid: unix.Gettid(), ok: true}
}

// release sets the thread back to the daemon's priority and gives it back
// to the runtime.
func (w *workerThread) release() {
	if !w.ok {
		return
	}
	w.setLow(false)
	w.ok = false
	runtime.UnlockOSThread()
}

// setLow gives the thread the background priority, or the daemon's.
func (w *workerThread) setLow(low bool) {
	if !w.ok {
		return
	}
	n := 0
	if low {
		n = backgroundNice
	}
	if n == w.nice {
		return
	}
	if unix.Setpriority(unix.PRIO_PROCESS, w.tid, n) == nil {
		w.nice = n
	}
}
