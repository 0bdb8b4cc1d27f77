// Command demo runs Streamer end to end on this machine (`make demo`): a
// local registry, a test image converted with `streamer create`, then
// streamer-snapshotter and containerd running a pod from it through CRI,
// and how much of the image the node had to fetch. Everything runs under a
// temporary directory and is torn down at the end, on failure and on Ctrl-C.
package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/streamer-dev/streamer/integration/harness"
)

// bigFile is the size of the file the demo image carries and never reads.
const bigFile = 64 << 20

func main() {
	start := time.Now()
	err := harness.RunProgram("demo", run)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo FAILED: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("demo OK in %v; everything stopped and removed\n", time.Since(start).Round(100*time.Millisecond))
}

var stepN int

func step(format string, args ...any) {
	stepN++
	fmt.Printf("[%d/9] %s\n", stepN, fmt.Sprintf(format, args...))
}

func show(out string) {
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		fmt.Println("      " + line)
	}
}

func mib(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	default:
		return fmt.Sprintf("%d bytes", n)
	}
}

func run(r *harness.Runner) error {
	if os.Getuid() != 0 {
		return fmt.Errorf("run as root: the demo starts containerd and mounts FUSE filesystems")
	}
	for _, bin := range []string{"containerd", "runc", "docker-registry", "skopeo"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%s is missing: run `make deps` (scripts/install-deps.sh)", bin)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := harness.ShortTempDir(r, "sd-")

	step("building streamer and streamer-snapshotter")
	bins, err := harness.BuildBinaries(ctx, filepath.Join(dir, "bin"))
	if err != nil {
		return err
	}

	step("starting a registry (docker-registry) on loopback")
	reg := harness.StartRegistry(r, filepath.Join(dir, "reg"))
	proxy := harness.StartCountingProxy(r, reg.Host)
	fmt.Printf("      registry http://%s, node traffic counted by a proxy at %s\n", reg.Host, proxy.Host)

	step("building and pushing a 3-layer image: busybox httpd serving a page, plus a %s file it never reads", mib(bigFile))
	pause, err := harness.PauseImage()
	if err != nil {
		return err
	}
	pauseRef := reg.Host + "/pause:v1"
	harness.BuildAndPush(r, filepath.Join(dir, "pause"), pauseRef, harness.PushOptions{}, pause)
	web, err := harness.WebImage("Hello from a streamed image!\n", 0, []harness.File{
		harness.Dir("data", 0o755), harness.Reg("data/model.bin", 0o644, harness.RandomBytes(1, bigFile)),
	})
	if err != nil {
		return err
	}
	ref := reg.Host + "/demo/web:v1"
	lay := harness.BuildAndPush(r, filepath.Join(dir, "web"), ref, harness.PushOptions{}, web)
	img := lay.Images[0]
	fmt.Printf("      %s: manifest %s, %d layers, %s compressed\n", ref, img.Manifest.Digest, len(img.Layers), mib(img.CompressedSize()))

	cli := func(args ...string) error {
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Minute)
		defer ccancel()
		fmt.Printf("      $ streamer %s\n", strings.Join(args, " "))
		out, err := harness.RunCommand(cctx, nil, bins.Streamer, args...)
		show(out)
		return err
	}
	step("converting it: streamer create")
	t0 := time.Now()
	if err := cli("create", ref); err != nil {
		return err
	}
	fmt.Printf("      converted in %v\n", time.Since(t0).Round(10*time.Millisecond))
	step("finding the artifact: streamer referrers")
	if err := cli("referrers", ref); err != nil {
		return err
	}
	step("showing it: streamer inspect")
	if err := cli("inspect", ref); err != nil {
		return err
	}

	step("starting streamer-snapshotter and containerd (CRI snapshotter = \"streamer\")")
	// Background fetch (on by default on nodes) would fetch the rest of the
	// image within a second on loopback; it is off here so the count below
	// shows what starting the container needed.
	background := false
	cfg, err := harness.SnapshotterConfig{
		Insecure:   []string{reg.Host, proxy.Host},
		Mirrors:    map[string][]string{reg.Host: {proxy.Host}},
		Background: &background,
	}.TOML()
	if err != nil {
		return err
	}
	sn := harness.StartSnapshotter(r, harness.SnapshotterOptions{Binary: bins.Snapshotter, Dir: filepath.Join(dir, "s"), Config: cfg, LogLevel: "info"})
	root, err := harness.ModuleRoot()
	if err != nil {
		return err
	}
	cd := harness.StartContainerd(r, harness.ContainerdOptions{
		Dir:                filepath.Join(dir, "c"),
		SnapshotterAddress: sn.Address,
		SandboxImage:       pauseRef,
		Mirrors:            map[string]string{reg.Host: "http://" + proxy.Host},
		BaseConfig:         filepath.Join(root, "docs", "containerd-config.toml"),
	})
	cri := cd.CRI(r)
	if _, err := cri.PullImage(ctx, pauseRef); err != nil {
		return err
	}

	step("running a pod from the streamed image through CRI, as kubelet would")
	proxy.Reset()
	t0 = time.Now()
	w := cri.RunWebPod(r, ctx, "demo", ref, filepath.Join(dir, "logs"))
	ready := time.Since(t0)
	fetched := proxy.BlobBytes()
	body, err := harness.HTTPGet(ctx, w.URL)
	if err != nil {
		return err
	}
	fmt.Printf("      GET %s -> %q\n", w.URL, strings.TrimSpace(body))
	fmt.Printf("      FUSE layer mounts: %d\n", len(harness.FuseMountsUnder(sn.Root)))

	step("result")
	fmt.Printf("      pod ready in %v having fetched %s of the image's %s (%.2f%%) from the registry\n",
		ready.Round(10*time.Millisecond), mib(fetched), mib(img.CompressedSize()), 100*float64(fetched)/float64(img.CompressedSize()))
	return nil
}
