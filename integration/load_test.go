package integration

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/integration/harness"
)

// Load and soak: many pods on one node at once, and readers running for a
// long time while the registry comes and goes. What a user of a node would
// check: every pod becomes ready, no read fails that the cache or a retry
// could have served, files read right, and the daemon's memory, descriptors
// and goroutines stay bounded.

// envDuration is a duration from the environment, or def.
func envDuration(t *testing.T, name string, def time.Duration) time.Duration {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive duration such as 60s or 30m", name, v)
	}
	return d
}

// envInt is a positive integer from the environment, or def.
func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// scrapeMetric reads one unlabelled metric from the snapshotter's /metrics.
// The client is shared by every call, so samples reuse one connection and
// do not add to the descriptors they measure.
func scrapeMetric(ctx context.Context, client *http.Client, name string) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://snapshotter/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, fmt.Errorf("scrape %s: %w", name, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				return 0, fmt.Errorf("metric %s: %w", name, err)
			}
			return f, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("scrape %s: %w", name, err)
	}
	return 0, fmt.Errorf("metric %s not exported", name)
}

// procSample is the snapshotter's footprint at one moment.
type procSample struct {
	At         time.Duration // since the sampler started
	RSS        int64         // bytes
	FDs        int
	Goroutines int // -1 when /metrics did not answer
}

// procRSS reads VmRSS of pid in bytes.
func procRSS(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read status of %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("VmRSS of %d: %w", pid, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// footprint samples the snapshotter's RSS, descriptors and goroutines.
func footprint(ctx context.Context, pid int, client *http.Client) (procSample, error) {
	var s procSample
	var err error
	if s.RSS, err = procRSS(pid); err != nil {
		return s, err
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return s, fmt.Errorf("list descriptors of %d: %w", pid, err)
	}
	s.FDs = len(fds)
	s.Goroutines = -1
	if g, err := scrapeMetric(ctx, client, "go_goroutines"); err == nil {
		s.Goroutines = int(g)
	}
	return s, nil
}

// sampler records the snapshotter's footprint every interval until stop.
type sampler struct {
	cancel context.CancelFunc
	done   chan struct{}
	start  time.Time

	mu      sync.Mutex
	samples []procSample
	errs    []error
	// each is called after every sample, on the sampler's goroutine.
	each func(context.Context)
}

func startSampler(n *node, client *http.Client, every time.Duration, each func(context.Context)) *sampler {
	ctx, cancel := context.WithCancel(context.Background())
	s := &sampler{cancel: cancel, done: make(chan struct{}), start: time.Now(), each: each}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			fp, err := footprint(ctx, n.sn.PID(), client)
			fp.At = time.Since(s.start)
			s.mu.Lock()
			if err != nil {
				s.errs = append(s.errs, err)
			} else {
				s.samples = append(s.samples, fp)
			}
			s.mu.Unlock()
			if s.each != nil {
				s.each(ctx)
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

// stop stops the sampler, waits for it, and returns what it recorded.
func (s *sampler) stop() ([]procSample, []error) {
	s.cancel()
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.samples), slices.Clone(s.errs)
}

// peak is the largest value of f over samples (goroutines: -1 ignored).
func peak(samples []procSample, f func(procSample) int64) int64 {
	m := int64(-1)
	for _, s := range samples {
		m = max(m, f(s))
	}
	return m
}

func rssOf(s procSample) int64 { return s.RSS }
func fdsOf(s procSample) int64 { return int64(s.FDs) }
func grsOf(s procSample) int64 { return int64(s.Goroutines) }

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// percentile is the p-th percentile (nearest rank) of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p/100+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// loadPod is one pod of the load test, started the way kubelet starts it.
type loadPod struct {
	pod   *harness.Pod
	url   string
	ready time.Duration // from the common start to the first HTTP 200
}

// startLoadPod pulls image, runs a sandbox and a busybox httpd container on
// a port of its own, and waits for the page. pods records the sandbox as
// soon as it exists, so cleanup finds it even when a later step fails.
func startLoadPod(ctx context.Context, n *node, start time.Time, name, image string, pods *podSet) (loadPod, error) {
	if _, err := n.cri.PullImage(ctx, image); err != nil {
		return loadPod{}, err
	}
	pod, err := n.cri.RunPod(ctx, name, filepath.Join(n.dir, "logs", name))
	if err != nil {
		return loadPod{}, err
	}
	pods.add(pod)
	port, err := harness.FreePort()
	if err != nil {
		return loadPod{}, err
	}
	cmd := harness.HTTPDCommand(port)
	id, err := pod.StartContainer(ctx, harness.ContainerSpec{Name: name, Image: image, Command: cmd[:1], Args: cmd[1:]})
	if err != nil {
		return loadPod{}, err
	}
	if err := n.cri.WaitRunning(ctx, id); err != nil {
		return loadPod{}, fmt.Errorf("%s: %w\ncontainer log: %s", name, err, harness.FileTail(pod.LogPath(name), 10))
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	if _, err := harness.WaitHTTP(ctx, url); err != nil {
		return loadPod{}, fmt.Errorf("%s: %w", name, err)
	}
	return loadPod{pod: pod, url: url, ready: time.Since(start)}, nil
}

// podSet holds the pods a test started, for its cleanup.
type podSet struct {
	mu   sync.Mutex
	pods []*harness.Pod
}

func (s *podSet) add(p *harness.Pod) {
	s.mu.Lock()
	s.pods = append(s.pods, p)
	s.mu.Unlock()
}

// removeAll stops and removes every pod, a few at a time, and forgets them.
func (s *podSet) removeAll(ctx context.Context) error {
	s.mu.Lock()
	pods := s.pods
	s.pods = nil
	s.mu.Unlock()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	sem := make(chan struct{}, 4)
	for _, p := range pods {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := p.Remove(ctx); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// TestNodeLoad starts STREAMER_LOAD_PODS pods (default 50) of five streamed
// images on one node at once through CRI, as kubelet would: every pod
// answers on its port, the snapshotter's memory stays bounded, and its
// goroutines come back near where they were once the pods and images are
// gone.
func TestNodeLoad(t *testing.T) {
	const images = 5
	pods := envInt(t, "STREAMER_LOAD_PODS", 50)
	const maxRSS = 512 << 20
	n := startNode(t)
	metrics := n.withMetrics(t, true)
	ctx := testContext(t, 8*time.Minute)

	refs := make([]string, images)
	for i := range images {
		files := []harness.File{harness.Dir("data", 0o755)}
		for j := range 4 {
			files = append(files, harness.Reg(fmt.Sprintf("data/f%d", j), 0o644, harness.RandomBytes(int64(5000+10*i+j), 1<<20)))
		}
		web, err := harness.WebImage(fmt.Sprintf("load image %d", i), 0, files)
		if err != nil {
			t.Fatal(err)
		}
		refs[i], _ = n.push(t, ctx, fmt.Sprintf("load%d", i), web, true)
	}

	// The baseline: the daemon serving the pause image and nothing else.
	base, err := footprint(ctx, n.sn.PID(), metrics)
	if err != nil {
		t.Fatal(err)
	}
	if base.Goroutines < 0 {
		t.Fatalf("the snapshotter exports no go_goroutines")
	}
	t.Logf("baseline: RSS %s, %d fds, %d goroutines", mib(base.RSS), base.FDs, base.Goroutines)

	var set podSet
	t.Cleanup(func() {
		cctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := set.removeAll(cctx); err != nil {
			t.Logf("remove pods: %v", err)
		}
	})
	smp := startSampler(n, metrics, 250*time.Millisecond, nil)
	t.Cleanup(func() { smp.stop() })

	start := time.Now()
	type result struct {
		p   loadPod
		err error
	}
	results := make(chan result, pods)
	for i := range pods {
		go func() {
			p, err := startLoadPod(ctx, n, start, fmt.Sprintf("load-%d", i), refs[i%images], &set)
			results <- result{p, err}
		}()
	}
	var ready []time.Duration
	var started []loadPod
	var failed []error
	for range pods {
		r := <-results
		if r.err != nil {
			failed = append(failed, r.err)
			continue
		}
		ready = append(ready, r.p.ready)
		started = append(started, r.p)
	}
	all := time.Since(start)
	if len(failed) > 0 {
		n.logs(t)
		t.Fatalf("%d of %d pods did not become ready; first errors:\n%v", len(failed), pods, errors.Join(failed[:min(3, len(failed))]...))
	}
	// Every pod still answers, with its own image's page.
	for i, p := range started {
		body, err := harness.HTTPGet(ctx, p.url)
		if err != nil || !strings.HasPrefix(body, "load image ") {
			t.Errorf("pod %d at %s: %q, %v", i, p.url, body, err)
		}
	}
	busy, errs := smp.stop()
	if len(errs) > 0 {
		t.Errorf("sampling the snapshotter failed %d times, first: %v", len(errs), errs[0])
	}
	slices.Sort(ready)
	peakRSS, peakG, peakFDs := peak(busy, rssOf), peak(busy, grsOf), peak(busy, fdsOf)
	t.Logf("%d pods of %d images ready in %v: ready time p50 %v, p90 %v, p99 %v, max %v",
		pods, images, all.Round(time.Millisecond), percentile(ready, 50).Round(time.Millisecond),
		percentile(ready, 90).Round(time.Millisecond), percentile(ready, 99).Round(time.Millisecond), ready[len(ready)-1].Round(time.Millisecond))
	t.Logf("snapshotter during the start (%d samples): peak RSS %s, peak %d goroutines, peak %d fds",
		len(busy), mib(peakRSS), peakG, peakFDs)
	if peakRSS >= maxRSS {
		t.Errorf("snapshotter peak RSS %s while starting %d pods, want below %s", mib(peakRSS), pods, mib(maxRSS))
	}

	// Pods and images gone: the mounts and what serves them go too.
	rmStart := time.Now()
	if err := set.removeAll(ctx); err != nil {
		t.Fatal(err)
	}
	for _, ref := range refs {
		if err := n.cri.RemoveImage(ctx, ref); err != nil {
			t.Fatal(err)
		}
	}
	// Near the baseline: the background fetch and HTTP client goroutines
	// that idle connections keep for a while.
	limit := base.Goroutines + 20
	var after procSample
	err = harness.WaitFor(ctx, nil, "snapshotter goroutines back near the baseline", func(ctx context.Context) error {
		after, err = footprint(ctx, n.sn.PID(), metrics)
		if err != nil {
			return err
		}
		if after.Goroutines < 0 || after.Goroutines > limit {
			return fmt.Errorf("%d goroutines, want at most %d (baseline %d)", after.Goroutines, limit, base.Goroutines)
		}
		return nil
	})
	t.Logf("after removing the pods and images (%v): RSS %s, %d fds, %d goroutines (baseline %d goroutines, %d fds); FUSE mounts left %d",
		time.Since(rmStart).Round(time.Millisecond), mib(after.RSS), after.FDs, after.Goroutines, base.Goroutines, base.FDs, len(n.fuseMounts()))
	if err != nil {
		n.logs(t)
		t.Errorf("%v", err)
	}
}

// soakRead is one read a container made: its times are centiseconds of
// the host's uptime (/proc/uptime, not namespaced), the clock the test
// records outages in.
type soakRead struct {
	image, file int
	t0, t1      int64 // centiseconds
	whole       bool  // sha256sum of the whole file; else one 128 KiB block
	rc          int
	sum, errMsg string
}

// soakScript reads random files of /data in a loop until uptime reaches
// end (centiseconds): one 128 KiB block at a random offset, or the whole
// file through sha256sum one time in four. Each read prints
// "R t0 t1 op file rc sum-or-error". At the end every file is read whole.
func soakScript(files, blocks int, end int64) string {
	return fmt.Sprintf(`now() { read u _ </proc/uptime; echo "${u%%.*}${u#*.}"; }
files=%d; blocks=%d; end=%d
while [ "$(now)" -lt $end ]; do
  f=$((RANDOM %% files)); t0=$(now)
  if [ $((RANDOM %% 4)) -eq 0 ]; then
    out=$(sha256sum /data/f$f 2>/tmp/err); rc=$?; op=sum; out=${out%%%% *}
  else
    dd if=/data/f$f of=/dev/null bs=131072 skip=$((RANDOM %% blocks)) count=1 2>/tmp/err; rc=$?; op=blk; out=-
  fi
  t1=$(now)
  [ $rc -ne 0 ] && out=$(tr '\n ' '__' </tmp/err)
  echo "R $t0 $t1 $op $f $rc $out"
  usleep 50000
done
f=0; while [ $f -lt $files ]; do
  t0=$(now); out=$(sha256sum /data/f$f 2>/tmp/err); rc=$?; out=${out%%%% *}; t1=$(now)
  [ $rc -ne 0 ] && out=$(tr '\n ' '__' </tmp/err)
  echo "F $t0 $t1 sum $f $rc $out"
  f=$((f+1))
done
`, files, blocks, end)
}

// parseSoakReads parses soakScript's output; final holds the closing
// whole-file reads.
func parseSoakReads(image int, out string) (reads, final []soakRead, err error) {
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || (f[0] != "R" && f[0] != "F") {
			return nil, nil, fmt.Errorf("reader output line %q", line)
		}
		r := soakRead{image: image, whole: f[3] == "sum"}
		var errs [4]error
		r.t0, errs[0] = strconv.ParseInt(f[1], 10, 64)
		r.t1, errs[1] = strconv.ParseInt(f[2], 10, 64)
		r.file, errs[2] = strconv.Atoi(f[4])
		r.rc, errs[3] = strconv.Atoi(f[5])
		if err := errors.Join(errs[:]...); err != nil {
			return nil, nil, fmt.Errorf("reader output line %q: %w", line, err)
		}
		if len(f) > 6 {
			if r.rc == 0 {
				r.sum = f[6]
			} else {
				r.errMsg = strings.ReplaceAll(strings.Join(f[6:], " "), "_", " ")
			}
		}
		if f[0] == "F" {
			final = append(final, r)
		} else {
			reads = append(reads, r)
		}
	}
	return reads, final, nil
}

// uptimeCS is the host's uptime in centiseconds, the readers' clock
// (/proc/uptime, which containers read too); 0 if it cannot be read.
func uptimeCS() int64 {
	data, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0
	}
	up, _, _ := strings.Cut(string(data), " ")
	whole, frac, _ := strings.Cut(up, ".")
	cs, _ := strconv.ParseInt(whole+frac, 10, 64)
	return cs
}

// outage is a time the registry was unreachable, in uptime centiseconds.
type outage struct {
	from, to int64
	how      string
	// Reads that overlapped it, how many failed, the longest (cs).
	reads, failed int
	longest       int64
}

// soakImage is one streamed image of the soak and what the test knows of
// it: the files' digests, and since when every layer is cached.
type soakImage struct {
	ref      string
	layers   []digest.Digest
	sums     []string
	complete int64 // uptime (cs) the status API first showed every layer complete; 0: not yet
	// cached[f] is the end of the first good whole read of file f.
	cached map[int]int64
}

// makeSoakImage pushes a converted web image with files random files of
// size bytes, their content drawn from seed.
func makeSoakImage(t *testing.T, ctx context.Context, n *node, name string, seed int64, files, size int) *soakImage {
	t.Helper()
	data := []harness.File{harness.Dir("data", 0o755)}
	im := &soakImage{cached: map[int]int64{}}
	for i := range files {
		b := harness.RandomBytes(seed+int64(i), size)
		data = append(data, harness.Reg(fmt.Sprintf("data/f%d", i), 0o644, b))
		im.sums = append(im.sums, sha(b))
	}
	web, err := harness.WebImage(name, 0, data)
	if err != nil {
		t.Fatal(err)
	}
	ref, img := n.push(t, ctx, name, web, true)
	im.ref = ref
	for _, l := range img.Layers {
		im.layers = append(im.layers, l.Digest)
	}
	return im
}

// soakReader is a container reading one image in a loop.
type soakReader struct {
	image int
	w     *harness.WebPod
	done  chan error
	out   string
}

// startSoakReader runs soakScript in w until end (uptime cs) over files
// of size bytes.
func startSoakReader(ctx context.Context, n *node, image int, w *harness.WebPod, files, size int, end int64) *soakReader {
	r := &soakReader{image: image, w: w, done: make(chan error, 1)}
	timeout := time.Duration(end-uptimeCS())*10*time.Millisecond + 3*time.Minute
	go func() {
		res, err := n.cri.Exec(ctx, w.Container, timeout, "/bin/sh", "-c", soakScript(files, size/(128<<10), end))
		if err == nil && res.ExitCode != 0 {
			err = fmt.Errorf("reader of image %d: exit %d: %s", image, res.ExitCode, res.Stderr)
		}
		r.out = res.Stdout
		r.done <- err
	}()
	return r
}

// TestNodeSoak runs containers that read random files of streamed images in
// a loop for STREAMER_SOAK_DURATION (default 60s; `make soak` runs 30m)
// while the registry flaps: unreachable for a few seconds every period
// (duration/6, at most 1 minute), stopped while the node's mirror in front
// of it in turn answers 503 and resets connections; one outage midway
// outlasts the read timeout. Background fetch is on, the link is slow, and
// every period a new image arrives just before an outage and the previous
// newcomer is removed. Checked: a read of a file already cached never fails; a read of
// uncached data fails only with EIO, only while the registry is down, and
// within the read timeout; every file reads with its sha256 once the
// registry is back; every layer completes in the background despite the
// outages; the daemon's RSS, descriptors and goroutines do not grow.
func TestNodeSoak(t *testing.T) {
	dur := envDuration(t, "STREAMER_SOAK_DURATION", 60*time.Second)
	period := min(dur/6, time.Minute)
	down := min(max(period*3/10, 2*time.Second), 10*time.Second)
	const files, steadySize, newSize = 6, 2 << 20, 8 << 20
	const steady = 2
	n := startNode(t)
	metrics := n.withMetrics(t, true)
	ctx := testContext(t, dur+10*time.Minute)
	// A slow link, so that background fetch of a newcomer is still under way
	// when the registry goes away.
	n.faults.SetRate(4 << 20)
	t.Logf("soak of %v: the registry is down %v every %v", dur, down, period)

	var (
		mu   sync.Mutex
		imgs []*soakImage
		outs []outage
	)
	addImage := func(name string, size int) (int, *soakImage) {
		im := makeSoakImage(t, ctx, n, name, int64(7000+1000*len(imgs)), files, size)
		mu.Lock()
		defer mu.Unlock()
		imgs = append(imgs, im)
		return len(imgs) - 1, im
	}
	// The sampler also drops the layer files' page cache, and notes when
	// the status API first shows an image complete.
	trackStatus := func(ctx context.Context) {
		dropLayerCaches(n)
		layers, err := layerStatus(ctx, metrics)
		if err != nil {
			return
		}
		now := uptimeCS()
		mu.Lock()
		defer mu.Unlock()
		// By layer digest: a layer two images share shows the image it
		// was mounted for first.
		complete := map[digest.Digest]bool{}
		for _, l := range layers {
			if l.Complete {
				complete[l.Layer] = true
			}
		}
		for _, im := range imgs {
			if im.complete == 0 && !slices.ContainsFunc(im.layers, func(d digest.Digest) bool { return !complete[d] }) {
				im.complete = now
			}
		}
	}

	logs := filepath.Join(n.dir, "logs")
	for i := range steady {
		addImage(fmt.Sprintf("soak%d", i), steadySize)
	}
	smp := startSampler(n, metrics, time.Second, trackStatus)
	t.Cleanup(func() { smp.stop() })
	start := time.Now()
	end := uptimeCS() + dur.Milliseconds()/10
	var readers []*soakReader
	for i := range steady {
		w := n.cri.RunWebPod(t, ctx, fmt.Sprintf("soak-%d", i), imgs[i].ref, logs)
		readers = append(readers, startSoakReader(ctx, n, i, w, files, steadySize, end))
	}

	// Each period: a newcomer image arrives, its pod starts and reads, the
	// registry goes away; the newcomer of the period before, complete by
	// now, is removed with its image.
	var prev *soakReader
	retire := func(r *soakReader) {
		if err := <-r.done; err != nil {
			t.Errorf("newcomer reader: %v", err)
		}
		readers = append(readers, r)
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		// Background fetch resumed after the outage and finished the image.
		if err := harness.WaitFor(cctx, nil, imgs[r.image].ref+" complete", func(ctx context.Context) error {
			trackStatus(ctx)
			mu.Lock()
			defer mu.Unlock()
			if imgs[r.image].complete == 0 {
				return errors.New("not every layer is complete")
			}
			return nil
		}); err != nil {
			t.Errorf("after the outage: %v", err)
		}
		if err := r.w.Remove(cctx); err != nil {
			t.Errorf("remove newcomer pod: %v", err)
		}
		if err := n.cri.RemoveImage(cctx, imgs[r.image].ref); err != nil {
			t.Errorf("%v", err)
		}
	}
	flaps, refused := 0, int64(0)
	for k := range int(dur / period) {
		next := start.Add(time.Duration(k+1) * period)
		if prev != nil {
			retire(prev)
		}
		// Larger than the steady images: its background fetch over the
		// slow link is still going when the registry goes away.
		i, im := addImage(fmt.Sprintf("soaknew%d", k), newSize)
		w := n.cri.RunWebPod(t, ctx, fmt.Sprintf("soaknew-%d", k), im.ref, logs)
		how := "503"
		if k%2 == 1 {
			how = "reset"
		}
		cached := "?"
		if layers, err := layerStatus(ctx, metrics); err == nil {
			var have, all int64
			for _, l := range layers {
				if slices.Contains(im.layers, l.Layer) {
					have, all = have+l.CachedBytes, all+l.UncompressedSize
				}
			}
			cached = fmt.Sprintf("%.0f%%", 100*float64(have)/float64(max(all, 1)))
		}

		before := n.faults.Requests()
		o := outage{from: uptimeCS(), how: how}
		// The node falls back from its mirror (the proxies) to the
		// registry itself: both go away. The mirror answers 503 or
		// resets connections; the registry is stopped (refused
		// connections, responses in flight cut).
		if how == "503" {
			n.faults.SetDown(true)
		} else {
			n.faults.SetReset(true)
		}
		n.reg.Stop()
		// One outage, midway, outlasts the read timeout: reads of data not
		// cached yet may then fail, with EIO, in time.
		d := down
		if k == int(dur/period)/2 {
			d = max(down, nodeReadTimeout+2*time.Second)
		}
		// The newcomer reads through this outage and until the period
		// ends, its closing whole-file reads after the registry is back.
		prev = startSoakReader(ctx, n, i, w, files, newSize, uptimeCS()+max(time.Until(next), d+2*time.Second).Milliseconds()/10)
		time.Sleep(d)
		n.reg.Start()
		n.faults.SetDown(false)
		n.faults.SetReset(false)
		o.to = uptimeCS()
		t.Logf("outage %d (%s) at %v for %v: the newcomer's layers were %s cached", k+1, how, time.Since(start).Round(time.Millisecond), d, cached)
		refused += n.faults.Requests() - before
		mu.Lock()
		outs = append(outs, o)
		mu.Unlock()
		flaps++
		time.Sleep(time.Until(next))
	}
	if prev != nil {
		retire(prev)
	}
	for _, r := range readers[:steady] {
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("steady reader: %v", err)
			}
		case <-ctx.Done():
			t.Fatalf("steady reader of image %d did not finish", r.image)
		}
	}
	// Every layer of the images still mounted completes in the background
	// despite the outages.
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := harness.WaitFor(wctx, nil, "every layer complete", func(ctx context.Context) error {
		trackStatus(ctx)
		mu.Lock()
		defer mu.Unlock()
		for _, im := range imgs[:steady] {
			if im.complete == 0 {
				return fmt.Errorf("%s not complete", im.ref)
			}
		}
		return nil
	}); err != nil {
		n.logs(t)
		t.Errorf("%v", err)
	}
	samples, serrs := smp.stop()
	elapsed := time.Since(start)

	// Judge every read.
	readTimeout := nodeReadTimeout.Milliseconds() / 10
	const slack = 200 // cs: exec, fork and clock granularity
	var total, failures, excused, uncachedInOutage int
	var problems []string
	mu.Lock()
	defer mu.Unlock()
	for _, rd := range readers {
		reads, final, err := parseSoakReads(rd.image, rd.out)
		if err != nil {
			t.Errorf("image %d: %v", rd.image, err)
			continue
		}
		im := imgs[rd.image]
		for _, r := range reads {
			total++
			cached := (im.complete != 0 && im.complete <= r.t0)
			if at, ok := im.cached[r.file]; ok && at <= r.t0 {
				cached = true
			}
			var during *outage
			for i := range outs {
				if r.t0 <= outs[i].to+slack && r.t1 >= outs[i].from {
					during = &outs[i]
					outs[i].reads++
					outs[i].longest = max(outs[i].longest, r.t1-r.t0)
					if r.rc != 0 {
						outs[i].failed++
					}
				}
			}
			if during != nil && !cached {
				uncachedInOutage++
			}
			if r.rc == 0 {
				if r.whole && r.sum != im.sums[r.file] {
					problems = append(problems, fmt.Sprintf("image %d f%d read whole at %d: sha256 %s, want %s", r.image, r.file, r.t0, r.sum, im.sums[r.file]))
				}
				if r.whole {
					if _, ok := im.cached[r.file]; !ok {
						im.cached[r.file] = r.t1
					}
				}
				continue
			}
			failures++
			why := ""
			switch {
			case cached:
				why = "its data was cached"
			case during == nil:
				why = "the registry was up"
			case !isEIO(r.errMsg):
				why = "the error is not EIO"
			case r.t1 > during.to+slack:
				why = fmt.Sprintf("it failed %d cs after the registry was back (a retry would have served it)", r.t1-during.to)
			case r.t1-r.t0 > readTimeout+slack:
				why = fmt.Sprintf("it took %d cs, beyond the read timeout", r.t1-r.t0)
			}
			if why != "" {
				problems = append(problems, fmt.Sprintf("image %d f%d %s read failed [%d, %d] (outage %+v): %s: %s",
					r.image, r.file, map[bool]string{true: "whole", false: "block"}[r.whole], r.t0, r.t1, during, r.errMsg, why))
			} else {
				excused++
			}
		}
		if len(final) != files {
			t.Errorf("image %d: %d final reads, want %d", rd.image, len(final), files)
		}
		for _, r := range final {
			if r.rc != 0 || r.sum != im.sums[r.file] {
				problems = append(problems, fmt.Sprintf("image %d f%d after the outages: rc %d sha256 %q %s, want %s", r.image, r.file, r.rc, r.sum, r.errMsg, im.sums[r.file]))
			}
		}
	}
	t.Logf("soak ran %v: %d outages of %v and one of %v (%d requests refused by the mirror), %d reads by %d containers, %d failed (%d excused: uncached data, registry down, EIO within the read timeout), %d reads of data not known to be cached during an outage",
		elapsed.Round(time.Second), flaps-1, down, max(down, nodeReadTimeout+2*time.Second), refused, total, len(readers), failures, excused, uncachedInOutage)
	for i, o := range outs {
		t.Logf("outage %d (%s, %d.%02d s): %d reads overlapped it, %d failed, the longest took %d.%02d s",
			i+1, o.how, (o.to-o.from)/100, (o.to-o.from)%100, o.reads, o.failed, o.longest/100, o.longest%100)
	}
	for _, p := range problems[:min(len(problems), 20)] {
		t.Errorf("%s", p)
	}
	if len(problems) > 20 {
		t.Errorf("... %d problems in all", len(problems))
	}
	if total < 10*len(readers) {
		t.Errorf("only %d reads in %v: the readers stalled", total, elapsed)
	}
	if flaps < 3 {
		t.Errorf("only %d outages; the soak needs at least 3 to mean anything", flaps)
	}

	// No leak: the last third of the samples against the first third,
	// after the first period (warm-up: caches and connections fill).
	if len(serrs) > 0 {
		t.Errorf("sampling the snapshotter failed %d times, first: %v", len(serrs), serrs[0])
	}
	var steadyState []procSample
	for _, s := range samples {
		if s.At >= period && s.Goroutines >= 0 {
			steadyState = append(steadyState, s)
		}
	}
	if len(steadyState) < 6 {
		t.Fatalf("only %d samples after warm-up", len(steadyState))
	}
	third := len(steadyState) / 3
	first, last := steadyState[:third], steadyState[len(steadyState)-third:]
	for _, c := range []struct {
		what  string
		f     func(procSample) int64
		slack func(int64) int64
		show  func(int64) string
	}{
		{"RSS", rssOf, func(v int64) int64 { return v/4 + 32<<20 }, mib},
		{"open fds", fdsOf, func(v int64) int64 { return 8 }, func(v int64) string { return strconv.FormatInt(v, 10) }},
		{"goroutines", grsOf, func(v int64) int64 { return v/10 + 20 }, func(v int64) string { return strconv.FormatInt(v, 10) }},
	} {
		a, b := peak(first, c.f), peak(last, c.f)
		t.Logf("%s: first third peak %s, last third peak %s (start %s, end %s, overall peak %s)",
			c.what, c.show(a), c.show(b), c.show(c.f(samples[0])), c.show(c.f(samples[len(samples)-1])), c.show(peak(samples, c.f)))
		if b > a+c.slack(a) {
			t.Errorf("%s grew from a peak of %s in the first third of the soak to %s in the last", c.what, c.show(a), c.show(b))
		}
	}
}
