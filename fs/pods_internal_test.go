package fs

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestReadUsage(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name, body string
		v2         bool
		want       time.Duration
		err        string
	}{
		{"v1", "1234567890\n", false, 1234567890, ""},
		{"v2", "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n", true, 2500 * time.Microsecond, ""},
		{"v2-late", "nr_periods 0\nusage_usec 7\n", true, 7 * time.Microsecond, ""},
		{"v1-garbage", "lots\n", false, 0, "read CPU time of"},
		{"v2-none", "user_usec 2000\n", true, 0, "no usage_usec"},
	}
	for _, tt := range tests {
		got, err := readUsage(write(tt.name, tt.body), tt.v2)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%s: err %v, want %q", tt.name, err, tt.err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%s: %v, %v; want %v", tt.name, got, err, tt.want)
		}
	}
	if _, err := readUsage(filepath.Join(dir, "missing"), false); err == nil {
		t.Error("missing file: no error")
	}
}

// TestPodWatchFindsCgroup: names are looked for under the v1 cpuacct
// hierarchy and the unified one, in order; a cgroup created later is found
// on a later look; none configured, or a share of 0, is no watch.
func TestPodWatchFindsCgroup(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "cpuacct", "kubepods"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "cpuacct", "kubepods", "cpuacct.usage"), []byte("5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	w := newPodWatch(podWatchOptions{cgroups: []string{"kubepods.slice", "kubepods"}, root: root, share: 0.25})
	w.findLocked(time.Now())
	if want := filepath.Join(root, "cpuacct", "kubepods", "cpuacct.usage"); w.file != want || w.v2 {
		t.Errorf("found %q (v2 %v), want %q", w.file, w.v2, want)
	}

	w = newPodWatch(podWatchOptions{cgroups: []string{"kubepods.slice"}, root: root, share: 0.25})
	w.findLocked(time.Now())
	if w.file != "" {
		t.Fatalf("found %q for a cgroup that is not there", w.file)
	}
	if err := os.MkdirAll(filepath.Join(root, "kubepods.slice"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "kubepods.slice", "cpu.stat"), []byte("usage_usec 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	w.findLocked(time.Now())
	if w.file != "" {
		t.Errorf("looked again before %v", podFind)
	}
	w.findLocked(time.Now().Add(podFind))
	if want := filepath.Join(root, "kubepods.slice", "cpu.stat"); w.file != want || !w.v2 {
		t.Errorf("found %q (v2 %v) after it was created, want %q", w.file, w.v2, want)
	}

	if newPodWatch(podWatchOptions{share: 0.25}) != nil || newPodWatch(podWatchOptions{cgroups: []string{"kubepods"}}) != nil {
		t.Error("a watch with no cgroup or no share is not off")
	}
	var off *podWatch
	off.wait(t.Context(), time.Second) // a nil watch never waits
	if off.waitedFor() != 0 {
		t.Error("nil watch waited")
	}
}

// usageSampler returns a watch of the share of two CPUs the tests use,
// and a function that lets the pods run at cpus for d of test time, writes
// their CPU time to the file the watch reads, takes a sample and returns
// the watch's state.
func usageSampler(t *testing.T) (*podWatch, func(d time.Duration, cpus float64) (now, hold bool)) {
	file := filepath.Join(t.TempDir(), "cpuacct.usage")
	w := newPodWatch(podWatchOptions{cgroups: []string{filepath.Dir(file)}, share: 0.25, cpus: 2, window: time.Second})
	var usage time.Duration
	at := time.Now()
	return w, func(d time.Duration, cpus float64) (now, hold bool) {
		t.Helper()
		at = at.Add(d)
		usage += time.Duration(float64(d) * cpus)
		if err := os.WriteFile(file, []byte(strconv.FormatInt(int64(usage), 10)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		w.file = file
		if !w.sampleLocked(at) {
			t.Fatal("sample failed")
		}
		return w.stateLocked()
	}
}

// TestPodWatchAverage: with the pods' CPU time read from a file the test
// writes, the last sample holds background work while the pods are busy;
// after a busy startup the average keeps it back for about half a second
// (1 s window, one CPU busy for 2 s, a limit of half a CPU); a 10 ms burst
// on an idle node holds it for that sample only.
func TestPodWatchAverage(t *testing.T) {
	_, sample := usageSampler(t)
	sample(0, 0)
	if now, hold := sample(10*time.Millisecond, 0.1); now || hold {
		t.Errorf("idle pods: now %v hold %v", now, hold)
	}
	for range 200 { // a startup: one CPU for 2 s
		if now, hold := sample(10*time.Millisecond, 1); !now || !hold {
			t.Fatalf("busy pods: now %v hold %v", now, hold)
		}
	}
	var held time.Duration
	for {
		now, hold := sample(10*time.Millisecond, 0)
		if now {
			t.Fatal("idle sample seen busy")
		}
		if !hold {
			break
		}
		held += 10 * time.Millisecond
	}
	if held < 400*time.Millisecond || held > 700*time.Millisecond {
		t.Errorf("held %v after a 2 s startup; want about ln(0.86/0.5) s", held)
	}
	for range 500 { // idle 5 s
		sample(10*time.Millisecond, 0)
	}
	if now, hold := sample(10*time.Millisecond, 2); !now || !hold {
		t.Errorf("burst: now %v hold %v; want held for the sample", now, hold)
	}
	if now, hold := sample(10*time.Millisecond, 0); now || hold {
		t.Errorf("after a 10 ms burst: now %v hold %v; want free", now, hold)
	}
}

// fakeCgroup is a cgroup whose CPU time grows at the rate the test sets
// (CPUs), read through podWatchOptions.read: a loaded machine cannot make
// it lag behind the rate the way a file rewritten by a goroutine would.
type fakeCgroup struct {
	mu    sync.Mutex
	rate  float64 // CPUs
	usage time.Duration
	last  time.Time
}

func (f *fakeCgroup) read(string, bool) (time.Duration, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	if !f.last.IsZero() {
		f.usage += time.Duration(float64(now.Sub(f.last)) * f.rate)
	}
	f.last = now
	return f.usage, nil
}

func (f *fakeCgroup) set(cpus float64) {
	f.read("", false)
	f.mu.Lock()
	f.rate = cpus
	f.mu.Unlock()
}

// TestPodPause: inside a run, podPause waits while the pods are busy and
// returns within a few samples of their going idle; pods busy for longer
// than podBusyCap let the run go on, its later pauses lasting a share of
// the work in between while the pods stay busy or were busy recently (none
// once they are idle on average too),
// until the pods are seen idle for podIdleSamples samples, which makes
// the budget whole again; a single idle sample does not. A context with
// no budget (on-demand and prefetch work) never pauses.
func TestPodPause(t *testing.T) {
	cg := &fakeCgroup{}
	w := newPodWatch(podWatchOptions{cgroups: []string{"/kubepods"}, share: 0.25, cpus: 2, window: time.Second, read: cg.read})
	took := func(ctx context.Context) time.Duration {
		start := time.Now()
		podPause(ctx)
		return time.Since(start)
	}
	// samples lets the pods run at cpus for n samples, each seen.
	samples := func(cpus float64, n int) {
		cg.set(cpus)
		for range n {
			time.Sleep(podSample + 2*time.Millisecond)
			w.busy(t.Context())
		}
	}

	ctx := w.withBudget(t.Context())
	samples(0, 2)
	if d := took(ctx); d > 15*time.Millisecond {
		t.Errorf("idle pods: paused %v", d)
	}

	samples(2, 2)
	if d := took(t.Context()); d > 5*time.Millisecond {
		t.Errorf("no budget in the context: paused %v", d)
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		cg.set(0)
	}()
	if d := took(ctx); d < 90*time.Millisecond || d > 400*time.Millisecond {
		t.Errorf("pods busy for 100 ms: paused %v", d)
	}
	if w.waitedFor() < 80*time.Millisecond {
		t.Errorf("waited for the pods: %v, want about 100 ms", w.waitedFor())
	}

	samples(2, 2)
	ctx = w.withBudget(t.Context())
	if d := took(ctx); d < podBusyCap-50*time.Millisecond || d > 3*podBusyCap {
		t.Errorf("pods busy all along: paused %v, want about %v", d, podBusyCap)
	}
	if d := took(ctx); d > 20*time.Millisecond {
		t.Errorf("budget spent, pods busy, no work since the last pause: paused %v again", d)
	}
	// Budget spent, pods busy: a pause lasts podDutyRatio times the work
	// since the last one, at most podDutyMax.
	time.Sleep(5 * time.Millisecond)
	if d := took(ctx); d < podDutyRatio*5*time.Millisecond-time.Millisecond || d > podDutyRatio*5*time.Millisecond+25*time.Millisecond {
		t.Errorf("budget spent, pods busy, 5 ms of work: paused %v, want about %v", d, podDutyRatio*5*time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	if d := took(ctx); d < podDutyMax-time.Millisecond || d > podDutyMax+25*time.Millisecond {
		t.Errorf("budget spent, pods busy, 50 ms of work: paused %v, want %v", d, podDutyMax)
	}
	samples(0, 1)
	samples(2, 2)
	if d := took(ctx); d > podDutyMax+25*time.Millisecond {
		t.Errorf("budget spent, one idle sample: paused %v, want no more than a share of the work", d)
	}
	// Idle in the last sample but busy on average (recently): still a
	// share of the work; idle on average too: none.
	samples(0, 2)
	time.Sleep(5 * time.Millisecond)
	if d := took(ctx); d < podDutyRatio*5*time.Millisecond-time.Millisecond || d > podDutyMax+25*time.Millisecond {
		t.Errorf("budget spent, pods idle in the last sample after a busy stretch: paused %v, want about %v", d, podDutyRatio*5*time.Millisecond)
	}
	for deadline := time.Now().Add(5 * time.Second); ; samples(0, 5) {
		if _, hold := w.busy(t.Context()); !hold {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the pods' average stayed over the share through 5 s of idle samples")
		}
	}
	time.Sleep(5 * time.Millisecond)
	if d := took(ctx); d > 5*time.Millisecond {
		t.Errorf("budget spent, pods idle, on average too: paused %v", d)
	}

	samples(0, podIdleSamples+1)
	samples(2, 2)
	go func() {
		time.Sleep(60 * time.Millisecond)
		cg.set(0)
	}()
	if d := took(ctx); d < 50*time.Millisecond {
		t.Errorf("pods seen idle since the budget was spent, busy again: paused %v, want a pause until they are idle", d)
	}
}

// TestPodPauseShared: the pauses of runs whose budget is spent are laid end
// to end, so that four runs working at once beside busy pods take the
// CPU share of one: after 5 ms of work each, their pauses end about 15,
// 30, 45 and 60 ms later, not all after 15 ms.
func TestPodPauseShared(t *testing.T) {
	cg := &fakeCgroup{}
	w := newPodWatch(podWatchOptions{cgroups: []string{"/kubepods"}, share: 0.25, cpus: 2, window: time.Second, read: cg.read})
	cg.set(2)
	for range 3 {
		time.Sleep(podSample + 2*time.Millisecond)
		w.busy(t.Context())
	}
	const runs = 4
	pauses := make([]time.Duration, runs)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range runs {
		b := &podBudget{w: w, left: 0, idle: w.idle.Load(), worked: start.Add(-5 * time.Millisecond)}
		ctx := context.WithValue(t.Context(), podBudgetKey{}, b)
		wg.Add(1)
		go func() {
			defer wg.Done()
			podPause(ctx)
			pauses[i] = time.Since(start)
		}()
	}
	wg.Wait()
	slices.Sort(pauses)
	want := runs * podDutyRatio * 5 * time.Millisecond
	if last := pauses[runs-1]; last < want-5*time.Millisecond || last > want+40*time.Millisecond {
		t.Errorf("four runs, 5 ms of work each, pods busy: the last pause ended after %v, want about %v (pauses %v)", last, want, pauses)
	}
	if first := pauses[0]; first > podDutyRatio*5*time.Millisecond+15*time.Millisecond {
		t.Errorf("the first run's pause ended after %v, want about %v", first, podDutyRatio*5*time.Millisecond)
	}
}

// TestPodPauseThreadCPU: on a worker's locked thread, the pause after a
// stretch of a run is a share of the CPU the thread used in it, not of the
// time it took: a run that waited 40 ms for the link (reading a range off
// the socket) and used no CPU pauses for no more than a sample, and one
// that computed for 5 ms pauses for about podDutyRatio times that.
func TestPodPauseThreadCPU(t *testing.T) {
	if threadCPUTime() == 0 {
		t.Fatal("CLOCK_THREAD_CPUTIME_ID gives no time")
	}
	cg := &fakeCgroup{}
	w := newPodWatch(podWatchOptions{cgroups: []string{"/kubepods"}, share: 0.25, cpus: 2, window: time.Second, read: cg.read})
	cg.set(2)
	for range 3 {
		time.Sleep(podSample + 2*time.Millisecond)
		w.busy(t.Context())
	}
	type result struct{ waited, computed time.Duration }
	done := make(chan result)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		ctx := w.withBudget(onWorkerThread(t.Context()))
		b := ctx.Value(podBudgetKey{}).(*podBudget)
		b.left = 0 // spent: every pause is a share of the work
		podPause(ctx)
		time.Sleep(40 * time.Millisecond)
		start := time.Now()
		podPause(ctx)
		waited := time.Since(start)
		for spin := threadCPUTime(); threadCPUTime()-spin < 5*time.Millisecond; {
		}
		start = time.Now()
		podPause(ctx)
		done <- result{waited, time.Since(start)}
	}()
	r := <-done
	if r.waited > 12*time.Millisecond {
		t.Errorf("after 40 ms asleep, no CPU used: paused %v, want at most about a sample", r.waited)
	}
	want := podDutyRatio * 5 * time.Millisecond
	if r.computed < want-2*time.Millisecond || r.computed > want+25*time.Millisecond {
		t.Errorf("after 5 ms of CPU: paused %v, want about %v", r.computed, want)
	}
}

// TestPodWatchRecent: after a startup of under a second, which leaves the
// pods' average under their share, requests that keep them over it in some
// samples and under it in others hold background work back throughout,
// and for podRecent after the last busy sample; not on a quiet node.
func TestPodWatchRecent(t *testing.T) {
	w, sampleFor := usageSampler(t)
	sample := func(cpus float64) (now, hold bool) {
		t.Helper()
		return sampleFor(podSample, cpus)
	}
	sample(0)
	for range 70 { // a startup: 0.8 CPU for 700 ms
		sample(0.8)
	}
	if w.over(w.average) {
		t.Fatalf("average %.2f CPUs after the startup; the test wants it under the share", w.average)
	}
	for i := range 20 { // requests: idle, busy, idle, busy...
		cpus := 1.2
		if i%2 == 0 {
			cpus = 0.2
		}
		if _, hold := sample(cpus); !hold {
			t.Fatalf("request sample %d (%.1f CPUs): not held", i, cpus)
		}
	}
	held := 0
	for range 20 {
		if _, hold := sample(0); hold {
			held++
		}
	}
	// The samples 10 to 40 ms after the last busy one.
	if want := int(podRecent/podSample) - 1; held != want {
		t.Errorf("held for %d idle samples after the requests, want %d", held, want)
	}
}
