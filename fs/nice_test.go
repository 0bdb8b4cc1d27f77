package fs

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// threadNice reads the nice value of thread tid of this process.
func threadNice(t *testing.T, tid int) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc/self/task", strconv.Itoa(tid), "stat"))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command name, which is in parentheses: state is
	// field 3, nice field 19.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	n, err := strconv.Atoi(f[19-3])
	if err != nil {
		t.Fatalf("nice of thread %d: %v", tid, err)
	}
	return n
}

// TestWorkerThreadNice: a worker's thread takes the background nice value
// and gives it back, the thread outlives the worker, and threads the runtime starts while the worker runs
// low do not inherit it.
func TestWorkerThreadNice(t *testing.T) {
	if !canRenice() {
		t.Skip("SKIP LOUDLY: this process cannot set a thread's nice value back (needs CAP_SYS_NICE); workers keep the daemon's priority")
	}
	type seen struct{ low, back, released, others int }
	res := make(chan seen, 1)
	var tid int
	go func() {
		th := lockWorkerThread()
		tid = th.tid
		th.setLow(true)
		var s seen
		s.low = threadNice(t, tid)
		// Blocking syscalls from many goroutines make the runtime start
		// threads while this one runs at the background priority.
		var wg sync.WaitGroup
		for range 32 {
			wg.Go(func() { unix.Nanosleep(&unix.Timespec{Nsec: int64(20 * time.Millisecond)}, nil) })
		}
		wg.Wait()
		entries, err := os.ReadDir("/proc/self/task")
		if err != nil {
			t.Error(err)
		}
		for _, e := range entries {
			id, _ := strconv.Atoi(e.Name())
			if id != tid && threadNice(t, id) != 0 {
				s.others++
			}
		}
		th.setLow(false)
		s.back = threadNice(t, tid)
		th.setLow(true)
		th.release()
		s.released = threadNice(t, tid)
		res <- s
	}()
	s := <-res
	// A thread given back lives on: children started with a parent-death
	// signal from it must not be killed when a worker stops.
	time.Sleep(50 * time.Millisecond)
	if _, err := os.Stat(filepath.Join("/proc/self/task", strconv.Itoa(tid))); err != nil {
		t.Errorf("the worker's thread ended with the worker: %v", err)
	} else if n := threadNice(t, tid); n != 0 {
		t.Errorf("the worker's thread was given back with nice %d, want 0", n)
	}
	if s.low != backgroundNice || s.back != 0 || s.released != 0 {
		t.Errorf("worker thread nice: %d when low, %d when set back, %d when released; want %d, 0 and 0", s.low, s.back, s.released, backgroundNice)
	}
	if s.others != 0 {
		t.Errorf("%d other threads run with a raised nice value: the worker's priority leaked", s.others)
	}
}
