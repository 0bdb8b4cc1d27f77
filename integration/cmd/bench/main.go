// Command bench is the readiness benchmark (`make bench-readiness`, and
// `make bench-quick` for a two-minute proof that it works): time from
// kubelet's PullImage call to the first 200 of the readiness probe, with
// containerd's full pull against Streamer, over a shaped registry link.
// Everything it starts (network namespace, registry, containerd,
// snapshotter, mounts) is removed at the end, on failure and on Ctrl-C.
// Results go to a results directory as markdown, JSON and SVG charts.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/streamer-dev/streamer/config"
	"github.com/streamer-dev/streamer/integration/bench"
	"github.com/streamer-dev/streamer/integration/harness"
	"github.com/streamer-dev/streamer/internal/testenv"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "delay-proxy" {
		os.Exit(delayProxy(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == "blob-storage" {
		os.Exit(blobStorage(os.Args[2:]))
	}
	err := harness.RunProgram("bench", run)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench FAILED: %v\n(everything it started was stopped and removed)\n", err)
		os.Exit(1)
	}
}

func run(r *harness.Runner) error {
	home, _ := os.UserHomeDir()
	var (
		quick         = flag.Bool("quick", false, "one small busybox image (no debootstrap), 2 runs, 2 pods, same-region: proves the harness works in a few minutes")
		images        = flag.String("images", "python,java,node,data", "images to measure, comma-separated: python, java, node, data")
		profile       = flag.String("profile", "same-region", "link profile: same-region (1 Gbit/s, 1 ms) or cross-region (200 Mbit/s, 40 ms)")
		runs          = flag.Int("runs", 5, "cold runs per cell")
		pods          = flag.Int("pods", 5, "pods of one image started at once in the scale scenario (0 or 1 skips it)")
		mix           = flag.Bool("mix", true, "also start three different images at once (the first three of -images)")
		modes         = flag.String("modes", "full,lazy,prefetch", "modes: full (overlayfs pull), lazy (Streamer), prefetch (Streamer with a prefetch list)")
		dataSize      = flag.String("data-size", "2GiB", "size of the data image's unread files")
		cache         = flag.String("cache", filepath.Join(home, ".cache", "streamer", "bench"), "cache of built images, the Debian base and the registry storage")
		out           = flag.String("out", "", "results directory (default <cache>/results/<UTC time>)")
		linkID        = flag.Int("link-id", os.Getpid()%16000, "picks the network namespace name and the /30 in 10.250.0.0/16")
		buildOnly     = flag.Bool("build-only", false, "build (or find cached) the images and exit")
		afterComplete = flag.Bool("requests-after-complete", false, "Streamer runs send the first requests once every layer is complete instead of right after readiness (tells the cost of the fetch still running from that of the data path)")
		perfDir       = flag.String("perf", "", "record the whole machine with perf (perf record -a -g) from each run's start to the end of its first requests, one file per run in this directory; the run's line gives the requests' window in perf's clock: for looking into what ran beside the pods, not for comparing (perf's own work shows in the figures)")
		registryNice  = flag.Int("registry-nice", 0, "run the registry and the delay proxy at this nice value (1-19): on the bench machine they share the node's CPUs, where a real registry is elsewhere; runs with it compare only with each other")
		flatCgroups   = flag.Bool("flat-cgroups", false, "leave every process in the root cgroup, as runs before 2026-12-01 did, instead of the CPU groups of a kubelet node (pods under kubepods at 1024 shares per CPU; containerd and the snapshotter in a group as in system.slice; the registry side in another)")
		blocks        = flag.Bool("blocks", false, "run the modes one after another, each with its own containerd, as runs before 2026-12-01 did, instead of side by side with each image's runs alternating between them")
		registryBlobs = flag.Bool("registry-serves-blobs", false, "the registry serves blob reads itself instead of redirecting them to blob storage beside it (as registries backed by object storage or a CDN do); docker-registry reads every range request's blob through a new 4 MiB buffer")
		wholeFiles    = flag.Bool("whole-files", false, "prefetch lists name whole files, without the byte ranges the startup read (as lists were before they carried ranges)")
		complete      = flag.Duration("complete-timeout", 10*time.Minute, "how long a Streamer run waits after readiness for every layer to be complete (fetched and verified) before it records the run as not complete; 0 does not wait")
	)
	flag.Parse()
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *quick {
		if !set["runs"] {
			*runs = 2
		}
		if !set["pods"] {
			*pods = 2
		}
		if !set["profile"] {
			*profile = "same-region"
		}
	}
	p, ok := bench.Profiles[*profile]
	if !ok {
		return fmt.Errorf("-profile %q: want same-region or cross-region", *profile)
	}
	if *perfDir != "" {
		if _, err := exec.LookPath("perf"); err != nil {
			return fmt.Errorf("-perf: %w (Debian: apt-get install linux-perf)", err)
		}
		if err := os.MkdirAll(*perfDir, 0o755); err != nil {
			return fmt.Errorf("-perf: %w", err)
		}
	}
	if *complete < 0 {
		return fmt.Errorf("-complete-timeout %v: want 0 or more", *complete)
	}
	if *runs < 1 {
		return fmt.Errorf("-runs %d: want at least 1", *runs)
	}
	size, err := config.ParseSize(*dataSize)
	if err != nil {
		return fmt.Errorf("-data-size: %w", err)
	}
	var recipes []bench.Recipe
	needDebootstrap := false
	if *quick {
		recipes = []bench.Recipe{bench.QuickRecipe()}
	} else {
		all := bench.Recipes(int64(size))
		for _, name := range strings.Split(*images, ",") {
			rc, ok := all[strings.TrimSpace(name)]
			if !ok {
				return fmt.Errorf("-images: unknown image %q (python, java, node, data)", name)
			}
			recipes = append(recipes, rc)
			needDebootstrap = needDebootstrap || rc.Debian != nil
		}
	}
	var ms []bench.Mode
	for _, m := range strings.Split(*modes, ",") {
		switch strings.TrimSpace(m) {
		case "full":
			ms = append(ms, bench.ModeFull)
		case "lazy":
			ms = append(ms, bench.ModeLazy)
		case "prefetch":
			ms = append(ms, bench.ModePrefetch)
		default:
			return fmt.Errorf("-modes: unknown mode %q (full, lazy, prefetch)", m)
		}
	}
	if err := bench.Preflight(needDebootstrap); err != nil {
		return err
	}
	if *buildOnly {
		b := &bench.Builder{CacheDir: *cache, Logf: func(format string, args ...any) { fmt.Printf(format+"\n", args...) }}
		for _, rc := range recipes {
			if _, err := b.Build(context.Background(), rc); err != nil {
				return err
			}
		}
		return nil
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable (the delay proxy runs it): %w", err)
	}
	blobStorage := []string{self, "blob-storage"}
	if *registryBlobs {
		blobStorage = nil
	}
	if *out == "" {
		*out = filepath.Join(*cache, "results", time.Now().UTC().Format("20060102-150405"))
	}
	start := time.Now()
	logf := func(format string, args ...any) {
		fmt.Printf("[%6.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Hour)
	defer cancel()
	rep, err := bench.RunBenchmark(ctx, r, bench.Config{
		CacheDir: *cache, OutDir: *out, Recipes: recipes, Profile: p, Runs: *runs,
		Pods: *pods, Mix: *mix && !*quick, Modes: ms, LinkID: *linkID, CompleteTimeout: *complete,
		RequestsAfterComplete: *afterComplete, PerfDir: *perfDir, WholeFiles: *wholeFiles, RegistryNice: *registryNice, FlatCgroups: *flatCgroups, Blocks: *blocks,
		DelayProxy: []string{self, "delay-proxy"}, BlobStorage: blobStorage, Logf: logf,
	})
	if rep != nil && len(rep.Cells) > 0 {
		files, werr := bench.WriteResults(*out, rep)
		if werr != nil {
			return werr
		}
		fmt.Println()
		fmt.Print(rep.Markdown())
		fmt.Printf("\nresults: %s\n", strings.Join(files, ", "))
	}
	if err != nil {
		return err
	}
	logf("bench done in %v", time.Since(start).Round(time.Second))
	return nil
}

// blobStorage is the hidden subcommand the benchmark runs inside the
// registry's network namespace: the storage the registry redirects blob
// reads to.
func blobStorage(args []string) int {
	fs := flag.NewFlagSet("blob-storage", flag.ExitOnError)
	listen := fs.String("listen", "", "address to listen on")
	root := fs.String("root", "", "the registry's storage root directory")
	_ = fs.Parse(args)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := testenv.ServeBlobStorage(ctx, *listen, *root); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// delayProxy is the hidden subcommand the benchmark runs inside the
// registry's network namespace.
func delayProxy(args []string) int {
	fs := flag.NewFlagSet("delay-proxy", flag.ExitOnError)
	listen := fs.String("listen", "", "address to listen on")
	upstream := fs.String("upstream", "", "address to forward to")
	delay := fs.Duration("delay", 0, "delay added in each direction")
	_ = fs.Parse(args)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := bench.ListenAndServeDelay(ctx, *listen, bench.DelayProxy{Upstream: *upstream, OneWay: *delay}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}
