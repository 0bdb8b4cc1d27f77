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
// and gives it back, and threads the runtime starts while the worker runs
// low do not inherit it.
func TestWorkerThreadNice(t *testing.T) {
	if !canRenice() {
		t.Skip("SKIP LOUDLY: this process cannot set a thread's nice value back (needs CAP_SYS_NICE); workers keep the daemon's priority")
	}
	type seen struct{ low, back, others int }
	res := make(chan seen, 1)
	release := make(chan struct{})
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
		res <- s
		<-release
	}()
	s := <-res
	close(release)
	if s.low != backgroundNice || s.back != 0 {
		t.Errorf("worker thread nice: %d when low, %d when set back; want %d and 0", s.low, s.back, backgroundNice)
	}
	if s.others != 0 {
		t.Errorf("%d other threads run with a raised nice value: the worker's priority leaked", s.others)
	}
}
