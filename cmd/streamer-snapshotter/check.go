package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/platforms"
	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/config"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/nodeconfig"
)

// checker prints one line per check, "OK ..." or "FAIL ...; fix: ...",
// and remembers whether any failed.
type checker struct {
	out    io.Writer
	failed bool
}

func (c *checker) ok(format string, args ...any) {
	fmt.Fprintf(c.out, "OK   %s\n", fmt.Sprintf(format, args...))
}

func (c *checker) fail(fix, format string, args ...any) {
	c.failed = true
	fmt.Fprintf(c.out, "FAIL %s; fix: %s\n", fmt.Sprintf(format, args...), fix)
}

// checkFlags are the check subcommand's flags.
type checkFlags struct {
	config, containerdConfig, containerdBin, image, platform string
	quick                                                    bool
	timeout, watch                                           time.Duration
}

func parseCheckFlags(args []string, stderr io.Writer) (f checkFlags, explicitConfig bool, err error) {
	fset := flag.NewFlagSet("check", flag.ContinueOnError)
	fset.SetOutput(stderr)
	fset.StringVar(&f.config, "config", defaultConfigPath, "streamer-snapshotter config file (optional when left at its default)")
	fset.StringVar(&f.containerdConfig, "containerd-config", defaultContainerdConfig, "containerd config file")
	fset.StringVar(&f.containerdBin, "containerd-bin", "containerd", "containerd binary whose version is checked")
	fset.StringVar(&f.image, "image", "", "image reference: check the registry answers and whether the image has a streaming artifact")
	fset.StringVar(&f.platform, "platform", platforms.DefaultString(), "platform of --image")
	fset.BoolVar(&f.quick, "quick", false, "only check that the daemon serves (socket, and /healthz when metrics are on): a liveness probe")
	fset.DurationVar(&f.timeout, "timeout", 20*time.Second, "time limit of the whole check")
	fset.DurationVar(&f.watch, "watch", 0, "repeat the check at this interval until SIGTERM, printing the lines whenever the result changes, and exit 0: the DaemonSet's long-running container")
	if err := fset.Parse(args); err != nil {
		return f, false, err
	}
	if fset.NArg() > 0 {
		return f, false, fmt.Errorf("check: unexpected arguments %q", fset.Args())
	}
	fset.Visit(func(fl *flag.Flag) { explicitConfig = explicitConfig || fl.Name == "config" })
	return f, explicitConfig, nil
}

func runCheck(args []string, stdout, stderr io.Writer) int {
	f, explicit, err := parseCheckFlags(args, stderr)
	if err != nil {
		return exitCode(err, stderr)
	}
	if f.watch > 0 {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		watchCheck(ctx, f, explicit, stdout)
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
	defer cancel()
	c := &checker{out: stdout}
	check(ctx, c, f, explicit)
	if c.failed {
		return 1
	}
	return 0
}

// watchCheck runs the check every f.watch until ctx ends. It prints a
// round's lines, timestamped, when they differ from the previous round's,
// so the log shows each change of the node's state once.
func watchCheck(ctx context.Context, f checkFlags, explicit bool, out io.Writer) {
	var last string
	for {
		var b strings.Builder
		cctx, cancel := context.WithTimeout(ctx, f.timeout)
		check(cctx, &checker{out: &b}, f, explicit)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if b.String() != last {
			last = b.String()
			for _, line := range strings.SplitAfter(strings.TrimSuffix(last, "\n"), "\n") {
				fmt.Fprintf(out, "%s %s", time.Now().UTC().Format(time.RFC3339), strings.TrimSuffix(line, "\n")+"\n")
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(f.watch):
		}
	}
}

func check(ctx context.Context, c *checker, f checkFlags, explicitConfig bool) {
	cfg, err := config.LoadDaemon(f.config)
	switch {
	case errors.Is(err, os.ErrNotExist) && !explicitConfig:
		cfg = config.DefaultDaemon()
		if !f.quick {
			c.ok("config %s absent: defaults apply", f.config)
		}
	case err != nil:
		c.fail("correct the file (streamer-snapshotter --print-default-config shows every key)", "config: %v", err)
		return
	default:
		if err := cfg.Validate(); err != nil {
			c.fail("correct the keys named", "config %s: %v", f.config, err)
			return
		}
		if !f.quick {
			c.ok("config %s valid", f.config)
		}
	}
	if f.quick {
		checkSocket(c, cfg.Address)
		checkHealth(ctx, c, cfg.MetricsAddress)
		return
	}
	checkFUSE(c)
	checkFilesystems(c)
	major := checkContainerdVersion(ctx, c, f.containerdBin)
	checkContainerdConfig(c, f.containerdConfig, cfg.Address, major)
	checkSocket(c, cfg.Address)
	checkCacheSpace(c, cfg)
	if f.image != "" {
		checkImage(ctx, c, cfg, f.image, f.platform)
	}
}

func checkFUSE(c *checker) {
	fd, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		c.fail("modprobe fuse; in a container, run privileged or pass the device /dev/fuse", "/dev/fuse: %v", err)
		return
	}
	fd.Close()
	c.ok("/dev/fuse opens read-write")
}

func checkFilesystems(c *checker) {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		c.fail("mount /proc", "read /proc/filesystems: %v", err)
		return
	}
	have := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 0 {
			have[fields[len(fields)-1]] = true
		}
	}
	for _, want := range []struct{ name, fix string }{
		{"fuse", "modprobe fuse (and add fuse to /etc/modules-load.d/ to keep it across reboots)"},
		{"overlay", "modprobe overlay (and add overlay to /etc/modules-load.d/)"},
	} {
		if have[want.name] {
			c.ok("kernel filesystem %s available", want.name)
		} else {
			c.fail(want.fix, "kernel filesystem %s missing from /proc/filesystems", want.name)
		}
	}
}

// checkContainerdVersion returns containerd's major version, 0 if unknown.
func checkContainerdVersion(ctx context.Context, c *checker, bin string) int {
	vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	outb, err := exec.CommandContext(vctx, bin, "--version").Output()
	if err != nil {
		c.fail("install containerd 1.6 or newer, or pass --containerd-bin", "containerd --version: %v", err)
		return 0
	}
	// "containerd github.com/containerd/containerd 1.6.20~ds1 <revision>"
	fields := strings.Fields(string(outb))
	if len(fields) < 3 {
		c.fail("install containerd 1.6 or newer", "containerd --version printed %q", strings.TrimSpace(string(outb)))
		return 0
	}
	v := strings.TrimPrefix(fields[2], "v")
	parts := strings.SplitN(v, ".", 3)
	major, err1 := strconv.Atoi(parts[0])
	minor := 0
	var err2 error
	if len(parts) > 1 {
		minor, err2 = strconv.Atoi(parts[1])
	}
	if err1 != nil || err2 != nil {
		c.fail("install containerd 1.6 or newer", "containerd version %q not understood", v)
		return 0
	}
	if major < 1 || (major == 1 && minor < 6) {
		c.fail("upgrade containerd to 1.6 or newer", "containerd %s too old", v)
		return major
	}
	c.ok("containerd %s", v)
	return major
}

func checkContainerdConfig(c *checker, path, address string, major int) {
	const fix = "run streamer-snapshotter install"
	b, err := os.ReadFile(path)
	if err != nil {
		c.fail(fix, "containerd config: %v", err)
		return
	}
	st, err := nodeconfig.Inspect(b, nodeconfig.DefaultName)
	if err != nil {
		c.fail("fix the file by hand, then run streamer-snapshotter install", "containerd config %s: %v", path, err)
		return
	}
	if major == 1 && st.Version > 2 {
		c.fail("write a version 2 config: containerd 1.x does not read version 3", "containerd config %s is version %d", path, st.Version)
	}
	name := nodeconfig.DefaultName
	switch {
	case st.PluginType == "snapshot" && st.PluginAddress == address:
		c.ok("containerd config has proxy plugin %s at %s", name, address)
	case st.PluginType == "":
		c.fail(fix, "containerd config %s has no proxy_plugins.%s", path, name)
	default:
		c.fail(fix, "containerd config %s: proxy_plugins.%s is type %q at %q, want type \"snapshot\" at %q", path, name, st.PluginType, st.PluginAddress, address)
	}
	if st.Snapshotter == name {
		c.ok("CRI snapshotter is %s", name)
	} else {
		shown := st.Snapshotter
		if shown == "" {
			shown = "unset (overlayfs)"
		}
		c.fail(fix, "CRI snapshotter is %s, want %s", shown, name)
	}
	if st.AnnotationsEnabled {
		c.ok("CRI passes snapshot annotations (disable_snapshot_annotations = false)")
	} else {
		c.fail(fix, "CRI does not pass snapshot annotations: disable_snapshot_annotations is not false, every image would be pulled normally")
	}
}

func checkSocket(c *checker, path string) {
	fi, err := os.Lstat(path)
	if err != nil {
		c.fail("start the daemon (systemctl start streamer-snapshotter)", "snapshotter socket: %v", err)
		return
	}
	if fi.Mode()&fs.ModeSocket == 0 {
		c.fail("remove the file and restart the daemon", "snapshotter socket %s is not a socket (%s)", path, fi.Mode())
		return
	}
	if perm := fi.Mode().Perm(); perm&^0o660 != 0 {
		c.fail(fmt.Sprintf("chmod 0660 %s (the daemon sets it; something changed it)", path), "snapshotter socket %s has mode %#o: others may drive the snapshotter", path, perm)
	} else {
		c.ok("snapshotter socket %s mode %#o", path, perm)
	}
	conn, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		c.fail("start the daemon (systemctl start streamer-snapshotter); see journalctl -u streamer-snapshotter", "snapshotter socket %s: nobody serves: %v", path, err)
		return
	}
	conn.Close()
	c.ok("snapshotter serves on %s", path)
}

// checkHealth asks /healthz when the daemon serves metrics.
func checkHealth(ctx context.Context, c *checker, addr string) {
	if addr == "" {
		return
	}
	tr := &http.Transport{}
	if filepath.IsAbs(addr) {
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}
		addr = "metrics"
	}
	defer tr.CloseIdleConnections()
	hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(hctx, http.MethodGet, "http://"+addr+"/healthz", nil)
	if err != nil {
		c.fail("correct metrics_address", "healthz: %v", err)
		return
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		c.fail("see the daemon's logs", "healthz: %v", err)
		return
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		c.fail("see the daemon's logs", "healthz: %s", resp.Status)
		return
	}
	c.ok("healthz answers 200")
}

func checkCacheSpace(c *checker, cfg config.Daemon) {
	dir := cfg.CacheDir()
	// The cache directory may not exist before the first start: measure
	// the filesystem it will live on.
	probe := dir
	for {
		if _, err := os.Stat(probe); err == nil || probe == filepath.Dir(probe) {
			break
		}
		probe = filepath.Dir(probe)
	}
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(probe, &sfs); err != nil {
		c.fail("create the cache directory's filesystem", "statfs %s: %v", probe, err)
		return
	}
	free := int64(sfs.Bavail) * int64(sfs.Bsize)
	var used int64
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				used += fi.Size()
			}
		}
		return nil
	})
	need := int64(cfg.Cache.MaxBytes) - used
	if free < need {
		c.fail(fmt.Sprintf("free space on %s or lower cache.max_bytes to at most %s", probe, human(free+used)),
			"cache %s: %s free, cache may still grow by %s (cache.max_bytes %s, %s used)", dir, human(free), human(need), cfg.Cache.MaxBytes, human(used))
		return
	}
	c.ok("cache %s: %s free for cache.max_bytes %s (%s used)", dir, human(free), cfg.Cache.MaxBytes, human(used))
}

func checkImage(ctx context.Context, c *checker, cfg config.Daemon, image, platform string) {
	const fix = "check the network path, registry.insecure, registry.mirrors and credentials in the config"
	ref, err := fetcher.ParseRef(image)
	if err != nil {
		c.fail("pass a reference such as registry.example.com/team/app:tag", "image: %v", err)
		return
	}
	creds := map[string]fetcher.Credential{}
	for host, cr := range cfg.Registry.Credentials {
		creds[host] = fetcher.Credential{Username: cr.Username, Password: cr.Password}
	}
	client, err := fetcher.New(fetcher.Options{
		Insecure:        cfg.Registry.Insecure,
		CAFiles:         cfg.Registry.CAFiles,
		DockerConfig:    cfg.Registry.DockerConfig,
		HostCredentials: creds,
		Mirrors:         cfg.Registry.Mirrors,
		Retries:         -1, // a check reports, it does not insist
		Timeout:         time.Duration(cfg.Fetch.Timeout),
		UserAgent:       "streamer-snapshotter-check/" + version,
	})
	if err != nil {
		c.fail("correct the registry section of the config", "registry client: %v", err)
		return
	}
	// The fetcher logs what it selects; a check prints its own lines.
	logrus.SetLevel(logrus.ErrorLevel)
	ims, err := client.ImageManifests(ctx, ref, platform)
	if err != nil {
		c.fail(fix, "registry %s: %v", ref.Host, err)
		return
	}
	if len(ims) == 0 {
		c.fail("pass --platform", "image %s has no %s manifest", ref, platform)
		return
	}
	im := ims[0]
	c.ok("registry %s reachable: %s is %s (%s)", ref.Host, ref, im.Descriptor.Digest, platform)
	_, desc, err := client.FindArtifact(ctx, ref, im.Descriptor)
	switch {
	case errors.Is(err, fetcher.ErrNoArtifact):
		c.ok("no artifact: %s will be pulled normally (convert it with `streamer create %s`)", ref, ref)
	case err != nil:
		c.fail(fix, "look up streaming artifact of %s: %v", ref, err)
	default:
		c.ok("artifact found: %s streams from %s", ref, desc.Digest)
	}
}

// human writes a byte count for people: "78.1GiB", "512B".
func human(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	f, i := float64(n), 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%dB", n)
	}
	return fmt.Sprintf("%.1f%s", f, units[i])
}
