package integration

import (
	"cmp"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/integration/harness"
)

// restartProbe measures how long a layer mount goes unanswered: it asks
// statfs (which the kernel never caches) in a loop and records the longest
// wait for an answer.
type restartProbe struct {
	mp   string
	stop chan struct{}
	done chan struct{}

	mu      sync.Mutex
	longest time.Duration
	errs    []error
}

func startProbe(mp string) *restartProbe {
	p := &restartProbe{mp: mp, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			start := time.Now()
			var st unix.Statfs_t
			err := unix.Statfs(p.mp, &st)
			d := time.Since(start)
			p.mu.Lock()
			if err != nil {
				p.errs = append(p.errs, err)
			}
			p.longest = max(p.longest, d)
			p.mu.Unlock()
		}
	}()
	return p
}

// take returns the longest wait since the last take, and the errors.
func (p *restartProbe) take() (time.Duration, []error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d, errs := p.longest, p.errs
	p.longest, p.errs = 0, nil
	return d, errs
}

// dropPageCache evicts the files under dir from the page cache, so the
// next reads of the container reach the FUSE server.
func dropPageCache(t *testing.T, dir string) {
	t.Helper()
	if err := evictDir(dir); err != nil {
		t.Fatal(err)
	}
}

// evictDir evicts the files of dir from the page cache; it goes on past a
// file it cannot open and returns the first error.
func evictDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("list %s: %w", dir, err)
	}
	var first error
	for _, e := range ents {
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			first = cmp.Or(first, err)
			continue
		}
		unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
		f.Close()
	}
	return first
}

// TestNodeSnapshotterRestartIsInvisible restarts streamer-snapshotter under
// a container reading a streamed image in a loop, once with SIGKILL and
// once with SIGTERM: the reads go on without error (at most one EIO, for a
// read in flight at a kill) and the container is never restarted.
func TestNodeSnapshotterRestartIsInvisible(t *testing.T) {
	n := startNode(t)
	ctx := testContext(t, 3*time.Minute)
	const files, size = 6, 3 << 20
	data := []harness.File{harness.Dir("data", 0o755)}
	sums := map[string]string{}
	for i := range files {
		b := harness.RandomBytes(int64(900+i), size)
		name := fmt.Sprintf("data/f%d", i)
		data = append(data, harness.Reg(name, 0o644, b))
		sums["/"+name] = sha(b)
	}
	web, err := harness.WebImage("restart", 0, data)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := n.push(t, ctx, "restartloop", web, true)
	w := n.cri.RunWebPod(t, ctx, "reader", ref, filepath.Join(n.dir, "logs"))
	// Two files are read (fetched, cached) before; the rest are not.
	execOK(t, ctx, w, "cat /data/f0 /data/f1 > /dev/null")
	pid1Start := execOK(t, ctx, w, "cut -d' ' -f22 /proc/1/stat")

	var dataMount string
	for _, mp := range n.fuseMounts() {
		if _, err := os.Stat(filepath.Join(mp, "data", "f0")); err == nil {
			dataMount = mp
		}
	}
	if dataMount == "" {
		t.Fatalf("no FUSE mount holds data/f0: %v", n.fuseMounts())
	}
	probe := startProbe(dataMount)
	t.Cleanup(func() { close(probe.stop); <-probe.done })

	const loopSeconds = 22
	script := fmt.Sprintf(`end=$(( $(date +%%s) + %d )); reads=0; errs=0; i=0
while [ $(date +%%s) -lt $end ]; do
  for f in /data/f*; do
    if ! dd if=$f of=/dev/null bs=131072 skip=$(( i %% 24 )) count=1 2>/tmp/dd.err; then errs=$((errs+1)); cat /tmp/dd.err >&2; fi
    reads=$((reads+1))
  done
  i=$((i+1)); usleep 10000
done
echo "$reads $errs"
sha256sum /data/f*`, loopSeconds)
	type result struct {
		res harness.ExecResult
		err error
	}
	loop := make(chan result, 1)
	go func() {
		res, err := n.cri.Exec(ctx, w.Container, (loopSeconds+30)*time.Second, "/bin/sh", "-c", script)
		loop <- result{res, err}
	}()

	kill := n.sn.Kill
	term := func() {
		if !n.sn.Stop(15 * time.Second) {
			t.Errorf("snapshotter did not stop on SIGTERM within 15s")
		}
	}
	type restart struct {
		name           string
		stop           func()
		before, settle time.Duration
	}
	restarts := []restart{
		{"SIGKILL", kill, 3 * time.Second, 2 * time.Second},
		{"SIGTERM", term, 2 * time.Second, 2 * time.Second},
	}
	// Then 20 in a row, under the same load.
	for i := range 20 {
		r := restart{fmt.Sprintf("SIGKILL #%d", i+1), kill, 0, 300 * time.Millisecond}
		if i%2 == 1 {
			r.name, r.stop = fmt.Sprintf("SIGTERM #%d", i+1), term
		}
		restarts = append(restarts, r)
	}
	mountsBefore := n.fuseMounts()
	var report []string
	for _, r := range restarts {
		time.Sleep(r.before)
		dropPageCache(t, filepath.Join(dataMount, "data"))
		probe.take()
		start := time.Now()
		r.stop()
		if err := n.sn.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(r.settle) // the probe sees the mount answer again
		longest, errs := probe.take()
		t.Logf("%s restart: daemon down and back in %v; longest unanswered statfs %v; probe errors %v",
			r.name, time.Since(start)-r.settle, longest, errs)
		report = append(report, fmt.Sprintf("%s: %v", r.name, longest.Round(time.Millisecond)))
		if len(errs) > 0 {
			t.Errorf("%s restart: the mount failed requests: %v", r.name, errs)
		}
		if left := n.fuseMounts(); len(left) == 0 {
			t.Fatalf("%s restart: no FUSE mounts left", r.name)
		}
	}
	t.Logf("mounts unanswered during restarts: %s", strings.Join(report, ", "))
	if after := n.fuseMounts(); strings.Join(after, ",") != strings.Join(mountsBefore, ",") {
		t.Errorf("FUSE mounts changed across restarts (taken over, not mounted again, expected):\nbefore %v\nafter  %v", mountsBefore, after)
	}
	if log := n.sn.LogTail(400); !strings.Contains(log, "took over live layer mount") {
		t.Errorf("the daemon never took a live mount over; log tail:\n%s", n.sn.LogTail(40))
	}

	var out result
	select {
	case out = <-loop:
	case <-ctx.Done():
		t.Fatal("reading loop did not finish")
	}
	if out.err != nil || out.res.ExitCode != 0 {
		n.logs(t)
		t.Fatalf("reading loop: %v, exit %d\nstdout: %s\nstderr: %s", out.err, out.res.ExitCode, out.res.Stdout, out.res.Stderr)
	}
	lines := strings.Split(strings.TrimSpace(out.res.Stdout), "\n")
	var reads, errs int
	if _, err := fmt.Sscan(lines[0], &reads, &errs); err != nil {
		t.Fatalf("loop output %q: %v", out.res.Stdout, err)
	}
	t.Logf("container loop: %d reads, %d errors", reads, errs)
	if errs > 1 || (errs > 0 && !isEIO(out.res.Stderr)) {
		n.logs(t)
		t.Errorf("container loop saw %d failed reads (at most one EIO, for a read in flight at a kill):\n%s", errs, out.res.Stderr)
	}
	if reads < files*loopSeconds {
		t.Errorf("container loop made only %d reads in %ds: it stalled", reads, loopSeconds)
	}
	for _, ln := range lines[1:] {
		f := strings.Fields(ln)
		if len(f) != 2 || sums[f[1]] != f[0] {
			t.Errorf("after the restarts: %q, want %s", ln, sums[f[len(f)-1]])
		}
	}
	if got := execOK(t, ctx, w, "cut -d' ' -f22 /proc/1/stat"); got != pid1Start {
		t.Errorf("the container's process changed (start time %s, was %s): it was restarted", got, pid1Start)
	}
	if _, err := harness.HTTPGet(ctx, w.URL); err != nil {
		t.Errorf("the container no longer serves: %v", err)
	}
}
