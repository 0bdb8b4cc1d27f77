package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/content"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/integration/harness"
)

// Config configures Run.
type Config struct {
	// CacheDir keeps built images, the Debian base and the registry's
	// storage between runs.
	CacheDir string
	// OutDir receives results.md, results.json and the charts.
	OutDir string
	// Recipes are the images to measure.
	Recipes []Recipe
	Profile Profile
	// Runs per cell (each cold).
	Runs int
	// Pods is N of the "N pods of one image at once" scenario; 0 skips it.
	Pods int
	// Mix runs the "three images at once" scenario with the first three
	// recipes.
	Mix bool
	// Modes to measure.
	Modes []Mode
	// RequestsAfterComplete makes Streamer runs send the first requests
	// only once every layer is complete, instead of right after
	// readiness: it tells the cost of the fetch still running from that of
	// the data path.
	RequestsAfterComplete bool
	// CompleteTimeout is how long a Streamer run waits, after readiness,
	// for every layer of its images to be complete; a run that reaches it
	// is recorded as not complete. 0 does not wait (complete is not
	// measured for Streamer).
	CompleteTimeout time.Duration
	// RegistryNice, when above 0, runs the registry and the delay proxy
	// at that nice value: they share the bench machine's CPUs with the
	// node, where a real registry is elsewhere, and while a Streamer run's
	// background fetch goes on they take CPU from the pods' first
	// requests. It slows a full pull's download too when the CPUs are
	// busy, so runs with it compare only with each other.
	RegistryNice int
	// FlatCgroups leaves every process the bench starts in the cgroup it
	// was started in (the root one, from a shell), as runs before
	// 2026-12-01 did. Otherwise the CPU controller is laid out as on a
	// kubelet node (harness.NewNodeCPU): pods under kubepods with 1024
	// shares per CPU, containerd and the snapshotter in a group of their
	// own as in system.slice, the registry side in another.
	FlatCgroups bool
	// Blocks runs the modes one after another, every run of one before
	// the next starts (as runs before 2026-12-01 did), instead of side by
	// side with their runs alternating.
	Blocks bool
	// WholeFiles drops the byte ranges of the recorded prefetch lists:
	// every listed file is prefetched (and pushed) whole, as lists were
	// before they carried ranges.
	WholeFiles bool
	// PerfDir, when set, records the whole machine with `perf record -a
	// -g` from each run's start to the end of its first requests, into a
	// file per run there: what ran beside the pods. perf starts before the
	// run's clock, so the requests follow readiness as they do without
	// it, and the run's line gives the requests' window in perf's clock
	// (CLOCK_MONOTONIC); perf's own work still shows in the figures, so a
	// run with it is for looking into, not for comparing.
	PerfDir string
	// LinkID picks the namespace, interfaces and /30 (see NewLink).
	LinkID int
	// DelayProxy is the command line prefix that runs the delay proxy
	// (this program's hidden subcommand); Run appends -listen, -upstream
	// and -delay.
	DelayProxy []string
	// BlobStorage is the command line prefix that runs the blob storage
	// the registry redirects blob reads to (this program's hidden
	// subcommand, testenv.ServeBlobStorage); Run appends -listen and
	// -root. It runs in the registry's namespace behind a delay proxy of
	// its own: most registries send blob reads to object storage or a CDN
	// in the same region. Without it the registry serves blobs itself.
	BlobStorage []string
	// Logf prints progress lines.
	Logf func(format string, args ...any)
}

func (c Config) logf(format string, args ...any) {
	if c.Logf != nil {
		c.Logf(format, args...)
	}
}

// Preflight checks what the benchmark needs and says what is missing.
func Preflight(needDebootstrap bool) error {
	if os.Getuid() != 0 {
		return errors.New("run as root: the benchmark creates a network namespace, starts containerd and mounts FUSE filesystems")
	}
	bins := []string{"containerd", "runc", "docker-registry", "skopeo", "ip", "tc", "chroot"}
	if needDebootstrap {
		bins = append(bins, "debootstrap")
	}
	var missing []string
	for _, b := range bins {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	if len(missing) > 0 {
		hint := "run `make deps`"
		if contains(missing, "debootstrap") {
			hint = "run `make bench-deps` (scripts/install-deps.sh --bench)"
		}
		return fmt.Errorf("missing %s: %s", strings.Join(missing, ", "), hint)
	}
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("no FUSE: open /dev/fuse: %w (load the fuse module or run `make deps`)", err)
	}
	f.Close()
	return nil
}

// bench is one benchmark run's state.
type bench struct {
	cfg     Config
	r       *harness.Runner
	dir     string
	bins    harness.Binaries
	link    Link
	regHost string // registry, direct (pushes; unshaped path inside the namespace)
	host    string // registry behind the delay proxy: what nodes pull from
	pause   string
	images  []benchImage
	report  *Report
	mu      sync.Mutex
	runSeq  int
	prefNA  string // why prefetch cells are not measured
	// regPIDs are the registry's and the delay proxy's processes.
	regPIDs []int
	// cpu is the kubelet-like CPU layout (nil with Config.FlatCgroups).
	cpu *harness.NodeCPU
}

// group is the CPU group of the node's daemons (system) or of the
// registry side (remote); nil without a layout.
func (b *bench) group(remote bool) *harness.CPUGroup {
	switch {
	case b.cpu == nil:
		return nil
	case remote:
		return b.cpu.Remote
	default:
		return b.cpu.System
	}
}

type benchImage struct {
	recipe Recipe
	built  Built
	ref    string // lazy/full reference
	pref   string // reference whose artifact carries a prefetch list ("" if none)
	// prefDirect is that image's direct registry reference, prefetch its
	// recorded list.
	prefDirect string
	prefetch   []string
}

// RunBenchmark builds the images, sets the link and registry up, measures every
// cell and writes the results. Everything it starts is stopped through r's
// cleanups, also on failure and Ctrl-C.
func RunBenchmark(ctx context.Context, r *harness.Runner, cfg Config) (*Report, error) {
	b := &bench{cfg: cfg, r: r, report: &Report{Profile: cfg.Profile, Date: time.Now().UTC(), LocalStart: map[string]time.Duration{}}}
	b.dir = harness.ShortTempDir(r, "sb-")
	var err error
	cfg.logf("building streamer and streamer-snapshotter")
	if b.bins, err = harness.BuildBinaries(ctx, filepath.Join(b.dir, "bin")); err != nil {
		return nil, err
	}
	builder := &Builder{CacheDir: cfg.CacheDir, Logf: cfg.Logf}
	for _, rc := range cfg.Recipes {
		built, err := builder.Build(ctx, rc)
		if err != nil {
			return nil, err
		}
		b.images = append(b.images, benchImage{recipe: rc, built: built})
	}
	if !cfg.FlatCgroups {
		if b.cpu, err = harness.NewNodeCPU(r, fmt.Sprintf("streamer-bench-%d", cfg.LinkID)); err != nil {
			return nil, fmt.Errorf("lay the CPU controller out as a kubelet node's (-flat-cgroups does without): %w", err)
		}
	}
	if err := b.startRegistry(ctx); err != nil {
		return nil, err
	}
	if err := b.publish(ctx); err != nil {
		return nil, err
	}
	if err := b.link.Shape(ctx); err != nil {
		return nil, err
	}
	cfg.logf("link %s shaped: %s, %v round trip (delay proxy); registry %s", b.link.NS, cfg.Profile.RateString(), cfg.Profile.RTT, b.host)
	b.report.Machine = machine()
	note, err := b.linkCheck(ctx)
	if err != nil {
		return nil, err
	}
	cfg.logf("%s", note)
	b.report.Notes = append(b.report.Notes, note)
	if len(cfg.BlobStorage) > 0 {
		b.report.Notes = append(b.report.Notes, "The registry redirects blob reads to blob storage beside it, behind the same link (as registries backed by object storage or a CDN do); the registry's CPU figures include the storage and both delay proxies. -registry-serves-blobs has the registry serve them itself.")
	} else {
		b.report.Notes = append(b.report.Notes, "The registry served blob reads itself (-registry-serves-blobs): docker-registry reads each range request's blob through a new 4 MiB buffer.")
	}
	if len(cfg.Modes) > 1 {
		if cfg.Blocks {
			b.report.Notes = append(b.report.Notes, "The modes ran one after another, every run of one before the next (-blocks).")
		} else {
			b.report.Notes = append(b.report.Notes, "The modes' nodes ran side by side, each image's runs alternating between them (run 1 of every mode, then run 2, ...).")
		}
	}
	if b.cpu != nil {
		b.report.Notes = append(b.report.Notes, "CPU groups as on a kubelet node ("+b.cpu.Shares+"); the bench's own client stays in the root cgroup. -flat-cgroups leaves every process in the root cgroup, as runs before 2026-12-01 did, where each daemon thread weighed as much as all pods together.")
	} else {
		b.report.Notes = append(b.report.Notes, "Every process in the root cgroup (-flat-cgroups): each thread of containerd, the snapshotter and the registry side weighed as much as all pods together.")
	}
	if cfg.RegistryNice > 0 {
		b.report.Notes = append(b.report.Notes, fmt.Sprintf("The registry and the delay proxy ran at nice %d (-registry-nice): these figures compare only with runs made the same way.", cfg.RegistryNice))
	}
	if err := b.probe(ctx); err != nil {
		return b.report, err
	}
	groups := [][]Mode{cfg.Modes}
	if cfg.Blocks {
		groups = nil
		for _, m := range cfg.Modes {
			groups = append(groups, []Mode{m})
		}
	}
	for _, g := range groups {
		if err := b.runModes(ctx, g); err != nil {
			return b.report, err
		}
	}
	return b.report, nil
}

// machine describes this machine for the report.
func machine() string {
	model := "unknown CPU"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	kernel := ""
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(data))
	}
	load := ""
	if data, err := os.ReadFile("/proc/loadavg"); err == nil {
		load = strings.Join(strings.Fields(string(data))[:3], " ")
	}
	return fmt.Sprintf("Machine: %d vCPU %s, kernel %s, %s; load average at start %s", runtime.NumCPU(), model, kernel, runtime.Version(), load)
}

// startRegistry creates the link and runs docker-registry and the delay
// proxy inside its namespace.
func (b *bench) startRegistry(ctx context.Context) error {
	b.link = NewLink(b.cfg.LinkID, b.cfg.Profile)
	if err := b.link.Up(b.r, ctx); err != nil {
		return err
	}
	storage := filepath.Join(b.cfg.CacheDir, "registry")
	if err := os.MkdirAll(storage, 0o755); err != nil {
		return err
	}
	b.regHost = b.link.NSIP + ":5001"
	b.host = b.link.NSIP + ":5000"
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	redirect := ""
	if len(b.cfg.BlobStorage) > 0 {
		// Blob storage on :5003, reached through a delay proxy on :5002.
		direct, shaped := b.link.NSIP+":5003", b.link.NSIP+":5002"
		if err := b.startRemote(wctx, "blob storage", "storage.log", append(append([]string{}, b.cfg.BlobStorage...), "-listen", direct, "-root", storage), "http://"+direct+"/"); err != nil {
			return err
		}
		if err := b.startDelay(wctx, shaped, direct, "storage-delay.log"); err != nil {
			return err
		}
		redirect = "http://" + shaped
	}
	cfg := harness.RegistryConfig(storage, b.regHost, redirect)
	cfgPath := filepath.Join(b.dir, "registry.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return err
	}
	reg, err := exec.LookPath("docker-registry")
	if err != nil {
		return fmt.Errorf("docker-registry: %w (make deps)", err)
	}
	if err := b.startRemote(wctx, "registry", "registry.log", []string{reg, "serve", cfgPath}, "http://"+b.regHost+"/v2/"); err != nil {
		return err
	}
	return b.startDelay(wctx, b.host, b.regHost, "delay.log")
}

// startRemote runs argv in the registry's namespace (niced as
// Config.RegistryNice says), counted with the registry's processes, and
// waits until u answers.
func (b *bench) startRemote(ctx context.Context, what, log string, argv []string, u string) error {
	argv = b.link.Exec(b.niced(argv...)...)
	p, err := harness.StartProcess(argv[0], filepath.Join(b.dir, log), argv[1:]...)
	if err != nil {
		return err
	}
	b.r.Cleanup(func() { p.Stop(5 * time.Second) })
	b.regPIDs = append(b.regPIDs, p.PID())
	if err := b.group(true).Add(p.PID()); err != nil {
		return err
	}
	if err := harness.WaitFor(ctx, p, what+" in "+b.link.NS, func(ctx context.Context) error {
		_, err := httpStatus(ctx, u)
		return err
	}); err != nil {
		return fmt.Errorf("%w\n%s log:\n%s", err, what, p.LogTail(20))
	}
	return nil
}

// startDelay runs a delay proxy from listen to upstream in the registry's
// namespace.
func (b *bench) startDelay(ctx context.Context, listen, upstream, log string) error {
	argv := append(append([]string{}, b.cfg.DelayProxy...), "-listen", listen, "-upstream", upstream, "-delay", (b.cfg.Profile.RTT / 2).String())
	return b.startRemote(ctx, "delay proxy to "+upstream, log, argv, "http://"+listen+"/")
}

// niced prefixes argv with nice -n Config.RegistryNice when it is set.
func (b *bench) niced(argv ...string) []string {
	if b.cfg.RegistryNice <= 0 {
		return argv
	}
	return append([]string{"nice", "-n", strconv.Itoa(b.cfg.RegistryNice)}, argv...)
}

func httpStatus(ctx context.Context, u string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

func fileSHA(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// publish pushes the pause image and every benchmark image to the registry
// and converts them with `streamer create`, unless the cached registry
// storage has them already (same manifest, same streamer binary).
func (b *bench) publish(ctx context.Context) error {
	pause, err := harness.PauseImage()
	if err != nil {
		return err
	}
	lay, err := harness.WriteLayout(filepath.Join(b.dir, "pause"), "v1", pause)
	if err != nil {
		return err
	}
	if err := harness.Push(ctx, lay, b.regHost+"/bench/pause:v1", harness.PushOptions{}); err != nil {
		return err
	}
	b.pause = b.host + "/bench/pause:v1"
	streamerSHA, err := fileSHA(b.bins.Streamer)
	if err != nil {
		return err
	}
	help, _ := harness.RunCommand(ctx, nil, b.bins.Streamer, "create", "--help")
	if !strings.Contains(help, "--prefetch-list") {
		b.prefNA = "streamer create has no --prefetch-list yet"
	} else if _, err := harness.RunCommand(ctx, nil, b.bins.Streamer, "profile", "--help"); err != nil {
		b.prefNA = "streamer has no profile command to record a prefetch list with"
	}
	wantPrefetch := b.prefNA == "" && contains(modeNames(b.cfg.Modes), string(ModePrefetch))
	markers := filepath.Join(b.cfg.CacheDir, "registry-markers")
	if err := os.MkdirAll(markers, 0o755); err != nil {
		return err
	}
	for i := range b.images {
		im := &b.images[i]
		im.ref = b.host + "/" + im.recipe.Name + ":v1"
		direct := b.regHost + "/" + im.recipe.Name + ":v1"
		marker := filepath.Join(markers, strings.ReplaceAll(im.recipe.Name, "/", "_")+"-"+im.built.Manifest.Encoded()[:16]+"-"+streamerSHA)
		if _, err := os.Stat(marker); err == nil {
			b.cfg.logf("image %s: already in the registry and converted", im.recipe.Name)
		} else {
			b.cfg.logf("image %s: pushing %s to the registry", im.recipe.Name, FmtBytes(im.built.Size))
			cctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
			_, err := harness.RunCommand(cctx, nil, "skopeo", "--insecure-policy", "copy", "--retry-times", "0", "--dest-tls-verify=false", im.built.Ref(), "docker://"+direct)
			cancel()
			if err != nil {
				return fmt.Errorf("push %s: %w", im.recipe.Name, err)
			}
			b.cfg.logf("image %s: converting (streamer create)", im.recipe.Name)
			t0 := time.Now()
			cctx, cancel = context.WithTimeout(ctx, 30*time.Minute)
			_, err = harness.RunCommand(cctx, nil, b.bins.Streamer, "--insecure", b.regHost, "create", direct)
			cancel()
			if err != nil {
				return fmt.Errorf("convert %s: %w", im.recipe.Name, err)
			}
			b.cfg.logf("image %s: converted in %v", im.recipe.Name, time.Since(t0).Round(100*time.Millisecond))
			if err := os.WriteFile(marker, nil, 0o644); err != nil {
				return err
			}
		}
		if wantPrefetch {
			// The same image under another name, converted with its
			// prefetch list once the probe has recorded it.
			im.prefDirect = b.regHost + "/" + im.recipe.Name + "-prefetch:v1"
			cctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
			_, err := harness.RunCommand(cctx, nil, "skopeo", "--insecure-policy", "copy", "--retry-times", "0", "--dest-tls-verify=false", im.built.Ref(), "docker://"+im.prefDirect)
			cancel()
			if err != nil {
				return fmt.Errorf("push %s for the prefetch mode: %w", im.recipe.Name, err)
			}
		}
	}
	return nil
}

// node is containerd (and the snapshotter) for one mode.
type node struct {
	mode        Mode
	r           *harness.Runner
	dir         string
	cd          *harness.Containerd
	cri         *harness.CRI
	cl          *containerd.Client
	sn          *harness.Snapshotter
	snCfg       harness.SnapshotterConfig
	snapshotter string
	metrics     string
	// waitComplete: runs wait for every layer to be complete (Streamer
	// with background fetch on).
	waitComplete bool
	keepContent  map[digest.Digest]bool
	keepSnaps    map[string]bool
	cacheSeq     int
}

// runModes starts a node for each of modes, side by side, and measures
// every cell of them: each image's runs alternate between the modes (run 1
// of each, then run 2 of each, ...), so that whatever drifts on the machine
// over minutes lands on every mode alike instead of on the ratio between
// them. A run makes only its own node cold; the others are idle then (no
// pod, their layers complete). The scenarios of several pods at once
// follow, node after node.
func (b *bench) runModes(ctx context.Context, modes []Mode) error {
	var run []Mode
	for _, m := range modes {
		if m == ModePrefetch && b.prefNA == "" {
			if err := b.convertPrefetch(ctx); err != nil {
				return err
			}
		}
		if m == ModePrefetch && b.prefNA != "" {
			b.cfg.logf("mode %s: skipped: %s", m, b.prefNA)
			for _, im := range b.images {
				b.addCell(Cell{Image: shortName(im), Mode: m, Scenario: ScenarioOne, NA: b.prefNA})
			}
			continue
		}
		run = append(run, m)
	}
	if len(run) == 0 {
		return nil
	}
	sub := &harness.Runner{Log: b.r.Log}
	b.r.Cleanup(sub.RunCleanups) // Ctrl-C while these modes run
	return sub.Run(func() error {
		nodes := make([]*node, len(run))
		for i, m := range run {
			var err error
			if nodes[i], err = b.startNode(ctx, sub, m, true); err != nil {
				return err
			}
		}
		for _, im := range b.images {
			if err := b.cellOne(ctx, nodes, im); err != nil {
				return err
			}
			for _, n := range nodes {
				if n.mode == ModeFull {
					if err := b.localStart(ctx, n, im); err != nil {
						return err
					}
				}
			}
		}
		for _, n := range nodes {
			if b.cfg.Pods > 1 {
				for _, im := range b.images {
					if err := b.cellScale(ctx, n, []benchImage{im}, b.cfg.Pods, ScenarioPods(b.cfg.Pods)); err != nil {
						return err
					}
				}
			}
			if b.cfg.Mix && len(b.images) >= 3 {
				if err := b.cellScale(ctx, n, b.images[:3], 1, ScenarioMix); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

func shortName(im benchImage) string { return filepath.Base(im.recipe.Name) }

func (b *bench) addCell(c Cell) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.report.Cells = append(b.report.Cells, c)
}

func (b *bench) startNode(ctx context.Context, r *harness.Runner, m Mode, background bool) (*node, error) {
	b.mu.Lock()
	b.runSeq++
	seq := b.runSeq
	b.mu.Unlock()
	n := &node{mode: m, r: r, dir: filepath.Join(b.dir, fmt.Sprintf("n%d", seq)), snapshotter: "overlayfs"}
	if err := os.MkdirAll(n.dir, 0o755); err != nil {
		return nil, err
	}
	opts := harness.ContainerdOptions{
		Dir:          filepath.Join(n.dir, "c"),
		SandboxImage: b.pause,
		Mirrors:      map[string]string{b.host: "http://" + b.host},
		CPUGroup:     b.group(false),
	}
	if m != ModeFull {
		n.snapshotter = "streamer"
		n.metrics = filepath.Join(n.dir, "m.sock")
		n.snCfg = harness.SnapshotterConfig{
			Insecure:       []string{b.host},
			Background:     new(background),
			MetricsAddress: n.metrics,
			CacheDir:       n.nextCacheDir(),
		}
		cfg, err := n.snCfg.TOML()
		if err != nil {
			return nil, err
		}
		n.waitComplete = background && b.cfg.CompleteTimeout > 0
		n.sn = harness.StartSnapshotter(r, harness.SnapshotterOptions{Binary: b.bins.Snapshotter, Dir: filepath.Join(n.dir, "s"), Config: cfg, LogLevel: "info", CPUGroup: b.group(false)})
		if b.cfg.OutDir != "" {
			// Registered after the daemon's own cleanup, so it runs first:
			// the log is kept with the results before the temp dir goes.
			log := n.sn.LogPath
			dst := filepath.Join(b.cfg.OutDir, fmt.Sprintf("snapshotter-%d-%s.log", seq, m))
			r.Cleanup(func() {
				if err := copyFile(log, dst); err != nil {
					b.cfg.logf("keep the snapshotter log: %v", err)
				}
			})
		}
		opts.SnapshotterAddress = n.sn.Address
		if root, err := harness.ModuleRoot(); err == nil {
			if p := filepath.Join(root, "docs", "containerd-config.toml"); fileExists(p) {
				opts.BaseConfig = p
			}
		}
	}
	what := "mode " + string(m)
	if m != ModeFull && !background {
		what = "startup probe (background fetch off)"
	}
	b.cfg.logf("%s: starting containerd (snapshotter %s)", what, n.snapshotter)
	n.cd = harness.StartContainerd(r, opts)
	n.cri = n.cd.CRI(r)
	n.cl = n.cd.Client(r)
	pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if _, err := n.cri.PullImage(pctx, b.pause); err != nil {
		return nil, fmt.Errorf("pull the pause image: %w", err)
	}
	// What is there now (the pause image) stays; everything else is
	// removed before each run.
	var err error
	if n.keepContent, n.keepSnaps, err = n.inventory(pctx); err != nil {
		return nil, err
	}
	return n, nil
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func (n *node) nextCacheDir() string {
	n.cacheSeq++
	return filepath.Join(n.dir, fmt.Sprintf("cache%d", n.cacheSeq))
}

func (n *node) nsCtx(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, harness.CRINamespace)
}

// inventory lists the content and snapshots containerd has now.
func (n *node) inventory(ctx context.Context) (map[digest.Digest]bool, map[string]bool, error) {
	ctx = n.nsCtx(ctx)
	cont := map[digest.Digest]bool{}
	if err := n.cl.ContentStore().Walk(ctx, func(i content.Info) error { cont[i.Digest] = true; return nil }); err != nil {
		return nil, nil, fmt.Errorf("list content: %w", err)
	}
	snaps := map[string]bool{}
	if err := n.cl.SnapshotService(n.snapshotter).Walk(ctx, func(_ context.Context, i snapshots.Info) error { snaps[i.Name] = true; return nil }); err != nil {
		return nil, nil, fmt.Errorf("list %s snapshots: %w", n.snapshotter, err)
	}
	return cont, snaps, nil
}

// cold removes pods, the benchmark images, their content and snapshots,
// restarts the snapshotter on an empty cache and drops the page cache.
func (b *bench) cold(ctx context.Context, n *node) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	n.cri.RemoveAllPods(ctx, n.r)
	for _, im := range b.images {
		for _, ref := range []string{im.ref, im.pref} {
			if ref != "" {
				_ = n.cri.RemoveImage(ctx, ref) // not there: fine
			}
		}
	}
	nctx := n.nsCtx(ctx)
	cs := n.cl.ContentStore()
	var blobs []digest.Digest
	if err := cs.Walk(nctx, func(i content.Info) error {
		if !n.keepContent[i.Digest] {
			blobs = append(blobs, i.Digest)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("list content: %w", err)
	}
	for _, d := range blobs {
		_ = cs.Delete(nctx, d)
	}
	sns := n.cl.SnapshotService(n.snapshotter)
	for pass := 0; ; pass++ {
		var left []string
		if err := sns.Walk(nctx, func(_ context.Context, i snapshots.Info) error {
			if !n.keepSnaps[i.Name] {
				left = append(left, i.Name)
			}
			return nil
		}); err != nil {
			return fmt.Errorf("list snapshots: %w", err)
		}
		if len(left) == 0 {
			break
		}
		if pass == 10 {
			return fmt.Errorf("snapshots left after cleanup: %v", left)
		}
		for _, k := range left {
			_ = sns.Remove(nctx, k) // parents fail until their children are gone
		}
	}
	if n.sn != nil {
		old := n.snCfg.CacheDir
		n.sn.Stop(10 * time.Second)
		_ = os.RemoveAll(old)
		n.snCfg.CacheDir = n.nextCacheDir()
		cfg, err := n.snCfg.TOML()
		if err != nil {
			return err
		}
		if err := os.WriteFile(n.sn.ConfigPath, []byte(cfg), 0o644); err != nil {
			return err
		}
		if err := n.sn.Start(); err != nil {
			return err
		}
		// containerd reconnects lazily: make it do so before the clock runs.
		if err := harness.WaitFor(ctx, nil, "containerd reaching the restarted snapshotter", func(ctx context.Context) error {
			return sns.Walk(n.nsCtx(ctx), func(context.Context, snapshots.Info) error { return nil })
		}); err != nil {
			return err
		}
	}
	return dropCaches()
}

// dropCaches writes dirty pages and drops the page cache, dentries and
// inodes, so every run reads from disk.
func dropCaches() error {
	unixSync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200); err != nil {
		return fmt.Errorf("drop page cache: %w", err)
	}
	return nil
}

// onDemandBytes reads streamer_fetched_bytes_by_cause_total{cause="on_demand"}
// from the snapshotter's metrics socket.
func (n *node) onDemandBytes(ctx context.Context) (int64, error) {
	if n.metrics == "" {
		return -1, nil
	}
	v := int64(-1)
	err := n.scrapeMetrics(ctx, func(r io.Reader) (err error) {
		v, err = ParseMetric(r, `streamer_fetched_bytes_by_cause_total{cause="on_demand"}`)
		return err
	})
	return v, err
}

// snapUse reads the snapshotter's FUSE request counts and times by
// operation and its range requests and bytes by cause (nil, nil on a full
// pull).
func (n *node) snapUse(ctx context.Context) (map[string]FUSEUse, *FetchUse, error) {
	if n.metrics == "" {
		return nil, nil, nil
	}
	var u map[string]FUSEUse
	var f *FetchUse
	err := n.scrapeMetrics(ctx, func(r io.Reader) error {
		page, err := io.ReadAll(r)
		if err != nil {
			return err
		}
		if u, err = ParseFUSEUse(bytes.NewReader(page)); err != nil {
			return err
		}
		f, err = ParseFetchUse(bytes.NewReader(page))
		return err
	})
	return u, f, err
}

// ParseFetchUse reads streamer_fetch_requests_total and
// streamer_fetched_bytes_by_cause_total from a metrics page.
func ParseFetchUse(r io.Reader) (*FetchUse, error) {
	const requests, byCause = "streamer_fetch_requests_total ", `streamer_fetched_bytes_by_cause_total{cause="`
	out := &FetchUse{Bytes: map[string]int64{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		var val, what string
		if v, ok := strings.CutPrefix(line, requests); ok {
			val, what = v, "requests"
		} else if rest, ok := strings.CutPrefix(line, byCause); ok {
			cause, v, ok := strings.Cut(rest, `"} `)
			if !ok {
				continue
			}
			val, what = v, cause
		} else {
			continue
		}
		f, err := strconv.ParseFloat(strings.Fields(val)[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metric line %q: %w", line, err)
		}
		if what == "requests" {
			out.Requests = int64(f)
		} else {
			out.Bytes[what] = int64(f)
		}
	}
	return out, sc.Err()
}

// fetchDelta is what after counts beyond before (nil when either is).
func fetchDelta(before, after *FetchUse) *FetchUse {
	if before == nil || after == nil {
		return nil
	}
	out := &FetchUse{Requests: after.Requests - before.Requests, Bytes: map[string]int64{}}
	for cause, n := range after.Bytes {
		if d := n - before.Bytes[cause]; d > 0 {
			out.Bytes[cause] = d
		}
	}
	return out
}

// scrapeMetrics gets the snapshotter's metrics page and hands it to parse.
func (n *node) scrapeMetrics(ctx context.Context, parse func(io.Reader) error) error {
	client := harness.UnixHTTPClient(n.metrics)
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://snapshotter/metrics", nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("read snapshotter metrics: %w", err)
	}
	defer resp.Body.Close()
	return parse(resp.Body)
}

// ParseFUSEUse reads streamer_fuse_operation_duration_seconds_count and
// _sum by operation from a metrics page.
func ParseFUSEUse(r io.Reader) (map[string]FUSEUse, error) {
	const name = "streamer_fuse_operation_duration_seconds"
	out := map[string]FUSEUse{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), name+"_")
		if !ok {
			continue
		}
		kind, rest, ok := strings.Cut(rest, `{op="`)
		if !ok || (kind != "count" && kind != "sum") {
			continue
		}
		op, val, ok := strings.Cut(rest, `"} `)
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(strings.Fields(val)[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metric %s_%s{op=%q}: %w", name, kind, op, err)
		}
		u := out[op]
		if kind == "count" {
			u.Count = int64(f)
		} else {
			u.Seconds = f
		}
		out[op] = u
	}
	return out, sc.Err()
}

// fuseDelta is what after counts beyond before.
func fuseDelta(before, after map[string]FUSEUse) map[string]FUSEUse {
	if after == nil {
		return nil
	}
	out := map[string]FUSEUse{}
	for op, a := range after {
		b := before[op]
		if d := (FUSEUse{Count: a.Count - b.Count, Seconds: a.Seconds - b.Seconds}); d.Count > 0 {
			out[op] = d
		}
	}
	return out
}

// ParseMetric finds the value of one series (name with labels, exactly as
// the Prometheus text format prints it) in a metrics page.
func ParseMetric(r io.Reader, series string) (int64, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.Fields(rest)[0], 64)
			if err != nil {
				return -1, fmt.Errorf("metric %s: %w", series, err)
			}
			return int64(f), nil
		}
	}
	if err := sc.Err(); err != nil {
		return -1, err
	}
	return -1, fmt.Errorf("metric %s not found", series)
}

// podRun is one pod of a measurement.
type podRun struct {
	im    benchImage
	ref   string
	pod   *harness.Pod
	port  int
	name  string
	pull  time.Duration
	ready time.Duration
	first []time.Duration
	// pullRx is the link counter when PullImage returned (full pull).
	pullRx    int64
	pullRxErr error
	err       error
}

// measured is what a measurement gives besides each pod's own times.
type measured struct {
	// linkBytes crossed the link from the PullImage calls to readiness;
	// startupBytes are the snapshotter's on-demand bytes by then (-1 when
	// not known).
	linkBytes, startupBytes int64
	// complete runs from the PullImage calls until every layer of every
	// image of the run is local: the slowest PullImage call on a full
	// pull, when the last layer became complete by the snapshotter's
	// status on Streamer (0 when not measured or not reached);
	// completeBytes crossed the link by then. notComplete says why it was
	// not reached.
	complete      time.Duration
	completeBytes int64
	notComplete   string
	// requestFUSE are the FUSE requests served during the first
	// requests (of every pod).
	requestFUSE map[string]FUSEUse
	// requestFetch are the range requests the snapshotter completed meanwhile.
	requestFetch *FetchUse
	// requestCPU is the CPU time of the node's parts meanwhile.
	requestCPU *CPUUse
}

// measure runs the pods cold: sandboxes first (as kubelet does before
// pulling), then from the clock's start, for every pod at once: PullImage,
// CreateContainer, StartContainer and the readiness probe polled every
// 10 ms until it answers 200. Once every pod is ready the link counter and
// the snapshotter's on-demand bytes are read, then each pod serves its
// first ten requests. On a Streamer node with background fetch on, the
// run then goes on (pods running) until the snapshotter reports every
// layer of the pulled images complete, or Config.CompleteTimeout passes:
// its status is polled every 100 ms once the requests are done, and the
// time of completion is the snapshotter's own record of when the last
// layer became complete. measure returns once that wait is over.
func (b *bench) measure(ctx context.Context, n *node, pods []*podRun) (measured, error) {
	m := measured{startupBytes: -1}
	if err := b.cold(ctx, n); err != nil {
		return m, fmt.Errorf("make the node cold: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Minute+b.cfg.CompleteTimeout)
	defer cancel()
	logs := filepath.Join(n.dir, "logs")
	for i, p := range pods {
		var err error
		if p.port, err = harness.FreePort(); err != nil {
			return m, err
		}
		p.name = fmt.Sprintf("%s-%d", shortName(p.im), i)
		if p.pod, err = n.cri.RunPod(ctx, p.name, logs); err != nil {
			return m, err
		}
	}
	defer func() {
		rctx, rcancel := context.WithTimeout(context.Background(), time.Minute)
		defer rcancel()
		for _, p := range pods {
			_ = p.pod.Remove(rctx)
		}
	}()
	stopPerf := b.startPerf(n)
	defer stopPerf()
	rx0, err := b.link.RxBytes()
	if err != nil {
		return m, err
	}
	t0 := time.Now()
	var wg sync.WaitGroup
	var readyWG sync.WaitGroup
	allReady := make(chan struct{})
	readyWG.Add(len(pods))
	for _, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			done := false
			markReady := func() {
				if !done {
					done = true
					readyWG.Done()
				}
			}
			defer markReady()
			if _, p.err = n.cri.PullImage(ctx, p.ref); p.err != nil {
				return
			}
			p.pull = time.Since(t0)
			if n.mode == ModeFull {
				p.pullRx, p.pullRxErr = b.link.RxBytes()
			}
			cmd := p.im.recipe.CommandFor(p.port)
			if _, p.err = p.pod.StartContainer(ctx, harness.ContainerSpec{Name: p.name, Image: p.ref, Command: cmd[:1], Args: cmd[1:]}); p.err != nil {
				return
			}
			base := fmt.Sprintf("http://127.0.0.1:%d", p.port)
			if p.err = harness.WaitFor(ctx, nil, "readiness of "+p.name, func(ctx context.Context) error {
				_, err := harness.HTTPGet(ctx, base+p.im.recipe.ReadyPath)
				return err
			}); p.err != nil {
				p.err = fmt.Errorf("%w\ncontainer log:\n%s", p.err, harness.FileTail(p.pod.LogPath(p.name), 20))
				return
			}
			p.ready = time.Since(t0)
			markReady()
			select {
			case <-allReady:
			case <-ctx.Done():
				p.err = ctx.Err()
				return
			}
			for i := 0; i < 10; i++ {
				s := time.Now()
				if _, err := harness.HTTPGet(ctx, base+p.im.recipe.WorkPath); err != nil {
					p.err = fmt.Errorf("request %d to %s: %w", i+1, p.name, err)
					return
				}
				p.first = append(p.first, time.Since(s))
			}
		}()
	}
	readyWG.Wait()
	rx1, rxErr := b.link.RxBytes()
	startup, mErr := n.onDemandBytes(ctx)
	// The completion poll starts once the requests are done, so that
	// status requests (and the snapshotter's work answering them) do not
	// share the node with the requests measured; the snapshotter reports
	// when each layer became complete, so a late first poll does not move
	// the time measured. With RequestsAfterComplete the requests wait for
	// it instead.
	type pollOutcome struct {
		res   CompleteResult
		rx    int64
		rxErr error
		err   error
	}
	var polled chan pollOutcome
	pctx, pcancel := context.WithCancel(ctx)
	defer pcancel()
	startPoll := func() {
		polled = make(chan pollOutcome, 1)
		poll := b.completePoll(n, pods)
		go func() {
			var o pollOutcome
			o.res, o.err = poll.Wait(pctx)
			if o.res.Complete {
				o.rx, o.rxErr = b.link.RxBytes()
			}
			polled <- o
		}()
	}
	failed := false
	for _, p := range pods {
		failed = failed || p.err != nil
	}
	if n.waitComplete && b.cfg.RequestsAfterComplete && !failed {
		startPoll()
		o := <-polled
		polled <- o
	}
	fuseBefore, fetchBefore, fErr := n.snapUse(ctx)
	parts := b.cpuParts(n)
	cpuBefore := sampleCPU(parts)
	reqStart := monotonic()
	close(allReady)
	wg.Wait()
	reqEnd := monotonic()
	m.requestCPU = cpuBetween(cpuBefore, sampleCPU(parts))
	// The snapshotter's counters before perf stops: its stop takes
	// seconds, while the background fetch goes on.
	if fErr == nil {
		var fuseAfter map[string]FUSEUse
		var fetchAfter *FetchUse
		if fuseAfter, fetchAfter, fErr = n.snapUse(ctx); fErr == nil {
			m.requestFUSE = fuseDelta(fuseBefore, fuseAfter)
			m.requestFetch = fetchDelta(fetchBefore, fetchAfter)
		}
	}
	stopPerf()
	if b.cfg.PerfDir != "" {
		b.cfg.logf("perf: the first requests ran from %.6f to %.6f (CLOCK_MONOTONIC, perf script's time)", reqStart.Seconds(), reqEnd.Seconds())
	}
	if fErr != nil {
		b.cfg.logf("warning: FUSE requests and fetches during the first requests not known: %v", fErr)
	}
	for _, p := range pods {
		if p.err != nil {
			return m, p.err
		}
	}
	if n.waitComplete && polled == nil {
		startPoll()
	}
	if rxErr != nil {
		return m, rxErr
	}
	if mErr != nil {
		b.cfg.logf("warning: %v", mErr)
	}
	m.linkBytes, m.startupBytes = rx1-rx0, startup
	switch {
	case polled != nil:
		o := <-polled
		if o.err != nil {
			return m, o.err
		}
		if o.rxErr != nil {
			return m, o.rxErr
		}
		if o.res.Complete {
			m.complete, m.completeBytes = o.res.At.Sub(t0), o.rx-rx0
		} else {
			m.notComplete = o.res.Why
			pending := ""
			if len(o.res.Pending) > 0 {
				pending = "; layers not complete: " + ShortDigests(o.res.Pending)
			}
			b.cfg.logf("warning: the layers of %s were not all complete: %s%s", describePods(pods), o.res.Why, pending)
		}
	case n.mode == ModeFull:
		// The layers are unpacked when PullImage returns: complete is the
		// slowest pull.
		for _, p := range pods {
			if p.pullRxErr != nil {
				return m, p.pullRxErr
			}
			if p.pull >= m.complete {
				m.complete, m.completeBytes = p.pull, p.pullRx-rx0
			}
		}
	}
	return m, nil
}

// cpuParts are the processes of the node whose CPU time is read around
// the first requests.
func (b *bench) cpuParts(n *node) cpuParts {
	p := cpuParts{"containerd": {n.cd.PID()}, "registry": b.regPIDs, "bench": {os.Getpid()}}
	if n.sn != nil {
		p["snapshotter"] = []int{n.sn.PID()}
	}
	return p
}

// startPerf starts `perf record` of the whole machine when Config.PerfDir
// is set (see there); the returned func stops it and waits for its file.
func (b *bench) startPerf(n *node) (stop func()) {
	if b.cfg.PerfDir == "" {
		return func() {}
	}
	name := fmt.Sprintf("perf-%s-%s.data", strings.ReplaceAll(string(n.mode), " ", "-"), time.Now().UTC().Format("150405.000"))
	path := filepath.Join(b.cfg.PerfDir, name)
	cmd := exec.Command("perf", "record", "-a", "-g", "-F", "4999", "-k", "CLOCK_MONOTONIC", "-o", path)
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		b.cfg.logf("warning: perf record: %v", err)
		return func() {}
	}
	time.Sleep(300 * time.Millisecond)
	var once sync.Once
	return func() {
		once.Do(func() { stopPerfCmd(b, cmd, path) })
	}
}

// stopPerfCmd stops perf record and waits for its file.
func stopPerfCmd(b *bench, cmd *exec.Cmd, path string) {
	_ = cmd.Process.Signal(os.Interrupt)
	if err := cmd.Wait(); err != nil {
		b.cfg.logf("warning: perf record: %v", err)
		return
	}
	b.cfg.logf("perf record of the run: %s", path)
}

// monotonic reads CLOCK_MONOTONIC, the clock perf record -k CLOCK_MONOTONIC
// stamps its samples with.
func monotonic() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

// describePods names the images of pods, for messages.
func describePods(pods []*podRun) string {
	var names []string
	for _, p := range pods {
		if !contains(names, p.ref) {
			names = append(names, p.ref)
		}
	}
	return strings.Join(names, ", ")
}

// completePoll waits for every layer of the images pods pulled to be
// complete, polling the node's snapshotter status.
func (b *bench) completePoll(n *node, pods []*podRun) CompletePoll {
	var images []PulledImage
	seen := map[string]bool{}
	for _, p := range pods {
		if seen[p.ref] {
			continue
		}
		seen[p.ref] = true
		im := PulledImage{Ref: p.ref}
		for _, l := range p.im.built.Layers {
			im.Layers = append(im.Layers, l.Digest)
		}
		images = append(images, im)
	}
	client := harness.UnixHTTPClient(n.metrics)
	return CompletePoll{
		Status:   func(ctx context.Context) (*SnapshotterStatus, error) { return FetchStatus(ctx, client) },
		Images:   images,
		Interval: 100 * time.Millisecond,
		Limit:    b.cfg.CompleteTimeout,
	}
}

// cellOne measures one pod of im Runs times on each of nodes, their runs
// alternating.
func (b *bench) cellOne(ctx context.Context, nodes []*node, im benchImage) error {
	cells := make([]*Cell, len(nodes))
	for j, n := range nodes {
		cells[j] = &Cell{Image: shortName(im), Mode: n.mode, Scenario: ScenarioOne}
		if n.refOf(im) == "" {
			cells[j].NA = "no prefetch list recorded for this image"
		}
	}
	for i := 0; i < b.cfg.Runs; i++ {
		for j, n := range nodes {
			c := cells[j]
			if c.NA != "" {
				continue
			}
			p := &podRun{im: im, ref: n.refOf(im)}
			m, err := b.measure(ctx, n, []*podRun{p})
			if err != nil {
				return fmt.Errorf("%s, %s, run %d: %w", c.Image, n.mode, i+1, err)
			}
			run := m.run()
			run.Pull, run.Ready, run.FirstRequests = p.pull, p.ready, p.first
			c.Runs = append(c.Runs, run)
			b.progress(*c, i, run, cells...)
		}
	}
	for _, c := range cells {
		b.addCell(*c)
	}
	return nil
}

// run is a Run with the figures of m; the caller adds the pods' times.
func (m measured) run() Run {
	return Run{LinkBytes: m.linkBytes, StartupBytes: m.startupBytes,
		Complete: m.complete, CompleteBytes: m.completeBytes, NotComplete: m.notComplete, RequestFUSE: m.requestFUSE, RequestFetch: m.requestFetch, RequestCPU: m.requestCPU}
}

// progress prints run i of c; a full-pull cell among peers (measured
// alongside, not in the report yet) or else in the report is what its
// completion is compared with.
func (b *bench) progress(c Cell, i int, r Run, peers ...*Cell) {
	extra := ""
	if r.StartupBytes >= 0 {
		extra = fmt.Sprintf(", %s on demand", FmtBytes(r.StartupBytes))
	}
	if r.RequestFUSE != nil {
		extra += "; FUSE requests during the first requests: " + FmtFUSE(r.RequestFUSE)
	}
	if r.RequestFetch != nil {
		extra += "; range requests meanwhile: " + FmtFetch(r.RequestFetch)
	}
	if r.RequestCPU != nil {
		extra += "; CPU meanwhile: " + FmtCPU(r.RequestCPU)
	}
	b.cfg.logf("[%s | %s | %s] run %d/%d: pull %s, ready %s, first requests %s mean, %s over the link%s",
		c.Image, c.Mode, c.Scenario, i+1, b.cfg.Runs, FmtDuration(r.Pull), FmtDuration(r.Ready), FmtDuration(Mean(r.FirstRequests)), FmtBytes(r.LinkBytes), extra)
	b.mu.Lock()
	full, _ := b.report.cell(c.Image, ModeFull, c.Scenario)
	b.mu.Unlock()
	for _, p := range peers {
		if p.Mode == ModeFull && p.Image == c.Image && p.Scenario == c.Scenario {
			full = *p
		}
	}
	if line := CompleteLine(r, c.Mode, full); line != "" {
		b.cfg.logf("[%s | %s | %s] run %d/%d: %s", c.Image, c.Mode, c.Scenario, i+1, b.cfg.Runs, line)
	}
}

// cellScale starts podsPer pods of each image at once, Runs times; one
// cell per image, whose ready time is its slowest pod's.
func (b *bench) cellScale(ctx context.Context, n *node, ims []benchImage, podsPer int, s Scenario) error {
	cells := make([]Cell, len(ims))
	for j, im := range ims {
		cells[j] = Cell{Image: shortName(im), Mode: n.mode, Scenario: s}
	}
	for i := 0; i < b.cfg.Runs; i++ {
		var pods []*podRun
		for _, im := range ims {
			ref := n.refOf(im)
			if ref == "" {
				return nil // no prefetch list: the one-pod cell says so
			}
			for k := 0; k < podsPer; k++ {
				pods = append(pods, &podRun{im: im, ref: ref})
			}
		}
		m, err := b.measure(ctx, n, pods)
		if err != nil {
			return fmt.Errorf("%s, %s: run %d: %w", s, n.mode, i+1, err)
		}
		for j, im := range ims {
			run := m.run()
			for _, p := range pods {
				if p.im.recipe.Name != im.recipe.Name {
					continue
				}
				run.Pull = max(run.Pull, p.pull)
				run.Ready = max(run.Ready, p.ready)
				run.FirstRequests = append(run.FirstRequests, p.first...)
			}
			cells[j].Runs = append(cells[j].Runs, run)
			b.progress(cells[j], i, run)
		}
	}
	for _, c := range cells {
		b.addCell(c)
	}
	return nil
}

// localStart measures the runtime's own start cost: the image stays
// fully pulled, the page cache is dropped, and the clock runs from the
// PullImage call (which finds the image present) to readiness.
func (b *bench) localStart(ctx context.Context, n *node, im benchImage) error {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if _, err := n.cri.PullImage(cctx, im.ref); err != nil {
		return err
	}
	var ds []time.Duration
	for i := 0; i < min(b.cfg.Runs, 3); i++ {
		if err := dropCaches(); err != nil {
			return err
		}
		p := &podRun{im: im, name: fmt.Sprintf("%s-local-%d", shortName(im), i)}
		var err error
		if p.port, err = harness.FreePort(); err != nil {
			return err
		}
		if p.pod, err = n.cri.RunPod(cctx, p.name, filepath.Join(n.dir, "logs")); err != nil {
			return err
		}
		t0 := time.Now()
		if _, err := n.cri.PullImage(cctx, im.ref); err != nil {
			return err
		}
		cmd := im.recipe.CommandFor(p.port)
		_, err = p.pod.StartContainer(cctx, harness.ContainerSpec{Name: p.name, Image: im.ref, Command: cmd[:1], Args: cmd[1:]})
		if err == nil {
			err = harness.WaitFor(cctx, nil, "readiness of "+p.name, func(ctx context.Context) error {
				_, err := harness.HTTPGet(ctx, fmt.Sprintf("http://127.0.0.1:%d%s", p.port, im.recipe.ReadyPath))
				return err
			})
		}
		d := time.Since(t0)
		_ = p.pod.Remove(cctx)
		if err != nil {
			return fmt.Errorf("local start of %s: %w", im.recipe.Name, err)
		}
		ds = append(ds, d)
	}
	local := seconds(SummarizeDurations(ds).Median)
	b.mu.Lock()
	b.report.LocalStart[shortName(im)] = local
	b.mu.Unlock()
	b.cfg.logf("[%s | local image] runtime start cost %s (median of %d)", shortName(im), FmtDuration(local), len(ds))
	return nil
}

// WriteResults writes results.md, results.json and one SVG chart per
// scenario into dir.
func WriteResults(dir string, rep *Report) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var files []string
	write := func(name string, data []byte) error {
		p := filepath.Join(dir, name)
		files = append(files, p)
		return os.WriteFile(p, data, 0o644)
	}
	if err := write("results.md", []byte(rep.Markdown())); err != nil {
		return nil, err
	}
	js, _ := json.MarshalIndent(rep, "", "  ")
	if err := write("results.json", js); err != nil {
		return nil, err
	}
	seen := map[Scenario]bool{}
	for _, c := range rep.Cells {
		if seen[c.Scenario] || len(c.Runs) == 0 {
			continue
		}
		seen[c.Scenario] = true
		name := "ready-" + strings.ReplaceAll(string(c.Scenario), " ", "-") + ".svg"
		if err := write(name, []byte(rep.SVG(c.Scenario))); err != nil {
			return nil, err
		}
	}
	return files, nil
}

func modeNames(ms []Mode) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = string(m)
	}
	return out
}

// refOf is the reference the node's mode pulls im by.
func (n *node) refOf(im benchImage) string {
	if n.mode == ModePrefetch {
		return im.pref
	}
	return im.ref
}

// probe runs each image once on a Streamer node with background fetch
// off: the on-demand bytes by readiness are then exactly what the workload
// read at startup (with background fetch on, a read often finds its chunk
// fetched already and is not counted), the figure the lower bounds use.
// The snapshotter's startup profile of that run becomes the image's
// prefetch list when the prefetch mode is measured.
func (b *bench) probe(ctx context.Context) error {
	sub := &harness.Runner{Log: b.r.Log}
	b.r.Cleanup(sub.RunCleanups)
	return sub.Run(func() error {
		n, err := b.startNode(ctx, sub, ModeLazy, false)
		if err != nil {
			return err
		}
		b.report.StartupBytes = map[string]int64{}
		for i := range b.images {
			im := &b.images[i]
			// measure returns after the ten work requests: the profile
			// taken below lists the files they read too.
			p := &podRun{im: *im, ref: im.ref}
			m, err := b.measure(ctx, n, []*podRun{p})
			if err != nil {
				return fmt.Errorf("startup probe of %s: %w", im.recipe.Name, err)
			}
			startup := m.startupBytes
			b.report.StartupBytes[shortName(*im)] = startup
			msg := ""
			if im.prefDirect != "" {
				pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				out, err := harness.RunCommand(pctx, nil, b.bins.Streamer, "profile", "--address", n.metrics, "--image", im.ref)
				cancel()
				if err != nil {
					b.cfg.logf("warning: no startup profile of %s: %v", im.recipe.Name, err)
				} else {
					im.prefetch = nil
					parts := 0
					for _, l := range strings.Split(out, "\n") {
						if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
							path, _, inPart := strings.Cut(l, "\t") // PATH<tab>RANGES: read in part
							if inPart {
								parts++
							}
							if b.cfg.WholeFiles {
								l = path
							}
							im.prefetch = append(im.prefetch, l)
						}
					}
					msg = fmt.Sprintf(", %d files read at startup (prefetch list), %d of them in part", len(im.prefetch), parts)
					if b.cfg.WholeFiles {
						msg += " (listed whole: -whole-files)"
					}
				}
			}
			b.cfg.logf("[%s | startup probe, background fetch off] ready %s, %s read on demand%s",
				shortName(*im), FmtDuration(p.ready), FmtBytes(startup), msg)
		}
		return nil
	})
}

// convertPrefetch converts each image's prefetch copy with the list the
// probe recorded; images without a list get no prefetch cells.
func (b *bench) convertPrefetch(ctx context.Context) error {
	for i := range b.images {
		im := &b.images[i]
		if im.prefDirect == "" || len(im.prefetch) == 0 {
			continue
		}
		list := filepath.Join(b.dir, filepath.Base(im.recipe.Name)+".prefetch")
		if err := os.WriteFile(list, []byte(strings.Join(im.prefetch, "\n")+"\n"), 0o644); err != nil {
			return err
		}
		b.cfg.logf("image %s: converting with a prefetch list of %d files", im.recipe.Name, len(im.prefetch))
		cctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
		_, err := harness.RunCommand(cctx, nil, b.bins.Streamer, "--insecure", b.regHost, "create", "--prefetch-list", list, "--prefetch-ignore-missing", im.prefDirect)
		cancel()
		if err != nil {
			return fmt.Errorf("convert %s with its prefetch list: %w", im.recipe.Name, err)
		}
		im.pref = b.host + "/" + im.recipe.Name + "-prefetch:v1"
	}
	return nil
}

// linkCheck measures what one small range request to the registry costs
// over the shaped link (median of 20, each on a new connection as a cold
// fetcher's first would be, and 20 more on one kept-alive connection), and
// the rate of one large read: the figures a lazy pull's on-demand reads
// are made of.
func (b *bench) linkCheck(ctx context.Context) (string, error) {
	im := b.images[0]
	var big LayerInfo
	for _, l := range im.built.Layers {
		if l.Size > big.Size {
			big = l
		}
	}
	u := "http://" + b.host + "/v2/" + im.recipe.Name + "/blobs/" + big.Digest.String()
	where := "the registry"
	if len(b.cfg.BlobStorage) > 0 {
		// The snapshotter follows the registry's redirect once per blob
		// and reads ranges at the location: measure that.
		loc, err := redirectOf(ctx, u)
		if err != nil {
			return "", fmt.Errorf("link check: %w", err)
		}
		u, where = loc, "the blob's storage location (after the registry's redirect)"
	}
	get := func(c *http.Client, rng string) (time.Duration, int64, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return 0, 0, err
		}
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		t0 := time.Now()
		resp, err := c.Do(req)
		if err != nil {
			return 0, 0, fmt.Errorf("link check: %w", err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode >= 300 {
			return 0, 0, fmt.Errorf("link check: GET %s: %s, %v", u, resp.Status, err)
		}
		return time.Since(t0), n, nil
	}
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}
	kept := &http.Client{Transport: &http.Transport{}, Timeout: 30 * time.Second}
	var cold, warm []time.Duration
	for i := 0; i < 20; i++ {
		rng := fmt.Sprintf("bytes=%d-%d", int64(i)*65536, int64(i)*65536+4095)
		d, _, err := get(fresh, rng)
		if err != nil {
			return "", err
		}
		cold = append(cold, d)
		if d, _, err = get(kept, rng); err != nil {
			return "", err
		}
		warm = append(warm, d)
	}
	size := min(big.Size, 64<<20)
	d, n, err := get(kept, fmt.Sprintf("bytes=0-%d", size-1))
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("Link check: a 4 KiB range request to %s takes %s on a new connection, %s on a kept-alive one (medians of 20); a %s read runs at %.0f Mbit/s.",
		where, FmtDuration(seconds(SummarizeDurations(cold).Median)), FmtDuration(seconds(SummarizeDurations(warm).Median)),
		FmtBytes(n), float64(n)*8/d.Seconds()/1e6), nil
}

// redirectOf is where the registry redirects a GET of u.
func redirectOf(ctx context.Context, u string) (string, error) {
	c := &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	defer c.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	loc, err := resp.Location()
	if err != nil {
		return "", fmt.Errorf("GET %s: %s, no redirect: %w", u, resp.Status, err)
	}
	return loc.String(), nil
}

// copyFile copies src to dst (created or truncated).
func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}
