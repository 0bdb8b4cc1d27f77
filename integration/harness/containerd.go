package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// criPlugin is the CRI plugin's key in containerd's version 2 config.
const criPlugin = `io.containerd.grpc.v1.cri`

// ContainerdOptions configures StartContainerd.
type ContainerdOptions struct {
	// Dir holds root, state, socket and log; keep it short (socket paths).
	Dir string
	// SnapshotterAddress is the streamer snapshotter's socket; empty leaves
	// the proxy plugin out and CRI on overlayfs.
	SnapshotterAddress string
	// SandboxImage is the pause image reference.
	SandboxImage string
	// Mirrors maps a registry host to the plain-HTTP endpoint containerd
	// pulls it from (e.g. the registry itself, or a counting proxy).
	Mirrors map[string]string
	// BaseConfig is the containerd config file the test starts from
	// (docs/containerd-config.toml); empty uses DefaultContainerdConfig.
	BaseConfig string
	// Binary is the containerd executable; empty: $STREAMER_CONTAINERD,
	// else containerd on PATH (Debian's /usr/bin/containerd, 1.6).
	Binary string
	// Shim is the runc shim (containerd-shim-runc-v2) the CRI runtime
	// "runc" runs; empty: the one containerd finds on PATH.
	Shim string
	// CPUGroup, when set, is the cgroup containerd and its shims run in
	// (NodeCPU.System).
	CPUGroup *CPUGroup
}

// EnvContainerd names the containerd executable StartContainerd runs when
// ContainerdOptions.Binary is empty.
const EnvContainerd = "STREAMER_CONTAINERD"

// Containerd is a containerd daemon started for a test.
type Containerd struct {
	Address    string // gRPC socket (also the CRI socket)
	Root       string
	State      string
	ConfigPath string
	// Binary is the executable started; Version is the version its CRI
	// API reports (e.g. "1.6.20~ds1", "1.7.35").
	Binary   string
	Version  string
	proc     *Process
	dir      string
	cpuGroup *CPUGroup
}

// DefaultContainerdConfig is the node configuration the harness uses when
// docs/containerd-config.toml is not there: Streamer as a proxy plugin and
// CRI's snapshotter.
const DefaultContainerdConfig = `version = 2

[proxy_plugins]
  [proxy_plugins.streamer]
    type = "snapshot"
    address = "/run/streamer-snapshotter/streamer.sock"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "streamer"
    disable_snapshot_annotations = false
`

// ContainerdConfig builds the test daemon's config: base (docs) settings,
// with addresses, paths, sandbox image and registry mirrors overridden.
func ContainerdConfig(o ContainerdOptions, c *Containerd) ([]byte, error) {
	base := DefaultContainerdConfig
	if o.BaseConfig != "" {
		data, err := os.ReadFile(o.BaseConfig)
		if err != nil {
			return nil, fmt.Errorf("read base containerd config: %w", err)
		}
		base = string(data)
	}
	cfg := map[string]any{}
	if err := toml.Unmarshal([]byte(base), &cfg); err != nil {
		return nil, fmt.Errorf("parse base containerd config: %w", err)
	}
	cfg["version"] = 2
	cfg["root"] = c.Root
	cfg["state"] = c.State
	cfg["disabled_plugins"] = []string{
		"io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
		"io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
		"io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp",
		"io.containerd.internal.v1.tracing",
	}
	setPath(cfg, []string{"grpc", "address"}, c.Address)
	setPath(cfg, []string{"ttrpc", "address"}, "")
	setPath(cfg, []string{"debug", "address"}, "")
	setPath(cfg, []string{"debug", "level"}, "info")
	setPath(cfg, []string{"metrics", "address"}, "")
	cri := []string{"plugins", criPlugin}
	if o.SnapshotterAddress != "" {
		setPath(cfg, []string{"proxy_plugins", "streamer", "type"}, "snapshot")
		setPath(cfg, []string{"proxy_plugins", "streamer", "address"}, o.SnapshotterAddress)
	} else {
		delete(cfg, "proxy_plugins")
		setPath(cfg, append(cri, "containerd", "snapshotter"), "overlayfs")
	}
	if o.Shim != "" {
		// A runtime table replaces containerd's default one whole, so it
		// names its type too.
		runc := append(cri, "containerd", "runtimes", "runc")
		if _, ok := GetPath(cfg, append(runc, "runtime_type")...); !ok {
			setPath(cfg, append(runc, "runtime_type"), "io.containerd.runc.v2")
		}
		setPath(cfg, append(runc, "runtime_path"), o.Shim)
	}
	setPath(cfg, append(cri, "restrict_oom_score_adj"), true)
	setPath(cfg, append(cri, "disable_apparmor"), true)
	if o.SandboxImage != "" {
		setPath(cfg, append(cri, "sandbox_image"), o.SandboxImage)
	}
	setPath(cfg, append(cri, "cni", "bin_dir"), filepath.Join(o.Dir, "cni", "bin"))
	setPath(cfg, append(cri, "cni", "conf_dir"), filepath.Join(o.Dir, "cni", "conf"))
	// The test registries speak plain HTTP on loopback.
	delPath(cfg, append(cri, "registry", "config_path"))
	for host, ep := range o.Mirrors {
		setPath(cfg, append(cri, "registry", "mirrors", host, "endpoint"), []string{ep})
	}
	return toml.Marshal(cfg)
}

func setPath(m map[string]any, path []string, v any) {
	for _, k := range path[:len(path)-1] {
		next, ok := m[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[k] = next
		}
		m = next
	}
	m[path[len(path)-1]] = v
}

func delPath(m map[string]any, path []string) {
	for _, k := range path[:len(path)-1] {
		next, ok := m[k].(map[string]any)
		if !ok {
			return
		}
		m = next
	}
	delete(m, path[len(path)-1])
}

// GetPath returns the value at a key path of a decoded TOML document.
func GetPath(m map[string]any, path ...string) (any, bool) {
	var cur any = m
	for _, k := range path {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = mm[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// StartContainerd starts containerd (o.Binary, $STREAMER_CONTAINERD or
// /usr/bin/containerd) with a config built by ContainerdConfig and waits
// until its CRI API answers; c.Version is the version it reports. On cleanup it
// removes every pod, stops the daemon by PID (SIGTERM, then SIGKILL), kills
// the shims it started and unmounts everything under Dir.
func StartContainerd(t TB, o ContainerdOptions) *Containerd {
	t.Helper()
	c := &Containerd{
		Address:  filepath.Join(o.Dir, "c.sock"),
		Root:     filepath.Join(o.Dir, "root"),
		State:    filepath.Join(o.Dir, "state"),
		dir:      o.Dir,
		cpuGroup: o.CPUGroup,
	}
	if len(c.Address) > 100 {
		t.Fatalf("containerd socket path too long: %s", c.Address)
	}
	for _, d := range []string{c.Root, c.State, filepath.Join(o.Dir, "cni", "bin"), filepath.Join(o.Dir, "cni", "conf")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatalf("containerd dirs: %v", err)
		}
	}
	data, err := ContainerdConfig(o, c)
	if err != nil {
		t.Fatalf("containerd config: %v", err)
	}
	c.ConfigPath = filepath.Join(o.Dir, "containerd.toml")
	if err := os.WriteFile(c.ConfigPath, data, 0o644); err != nil {
		t.Fatalf("write containerd config: %v", err)
	}
	bin, err := containerdBinary(o.Binary)
	if err != nil {
		t.Fatalf("containerd: %v", err)
	}
	c.Binary = bin
	c.proc, err = StartProcess(bin, filepath.Join(o.Dir, "containerd.log"), "--config", c.ConfigPath)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() { c.shutdown(t) })
	if err := o.CPUGroup.Add(c.proc.PID()); err != nil {
		t.Fatalf("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.waitCRI(ctx); err != nil {
		t.Fatalf("start containerd: %v\nconfig:\n%s\nlog tail:\n%s", err, data, c.proc.LogTail(40))
	}
	return c
}

// containerdBinary resolves the containerd executable to run.
func containerdBinary(bin string) (string, error) {
	if bin == "" {
		bin = os.Getenv(EnvContainerd)
	}
	if bin == "" {
		p, err := lookPath("containerd")
		if err != nil {
			return "", fmt.Errorf("%w (make deps installs Debian's containerd; or set %s)", err, EnvContainerd)
		}
		return p, nil
	}
	if fi, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("containerd binary: %w", err)
	} else if fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("containerd binary %s is not an executable file", bin)
	}
	return bin, nil
}

// LogTail returns the end of containerd's log.
func (c *Containerd) LogTail(n int) string { return c.proc.LogTail(n) }

func (c *Containerd) shutdown(t TB) {
	if t.Failed() {
		t.Logf("containerd log tail:\n%s", c.proc.LogTail(40))
	}
	if ok, _ := c.proc.Exited(); !ok {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if cri, err := DialCRI(ctx, c.Address); err == nil {
			cri.RemoveAllPods(ctx, t)
			cri.Close()
		}
		cancel()
	}
	c.proc.Stop(5 * time.Second)
	for _, pid := range c.shimPIDs() {
		killTree(pid)
	}
	UnmountAll(t, c.dir)
}

// ShimExecutables lists the executables of the shims this daemon runs now
// (e.g. to check which containerd-shim-runc-v2 a runtime uses).
func (c *Containerd) ShimExecutables() []string {
	var out []string
	for _, pid := range c.shimPIDs() {
		if exe, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(pid), "exe")); err == nil {
			out = append(out, exe)
		}
	}
	return out
}

// shimPIDs finds the shims this daemon started: their command line names
// its socket, which is unique to this test.
func (c *Containerd) shimPIDs() []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmd), "\x00")
		if len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "containerd-shim") {
			continue
		}
		for i, a := range args {
			if a == "-address" && i+1 < len(args) && args[i+1] == c.Address {
				out = append(out, pid)
			}
		}
	}
	return out
}

// killTree SIGKILLs pid and all its descendants.
func killTree(pid int) {
	children := map[int][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		s := string(stat)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 2 {
			continue
		}
		pp, _ := strconv.Atoi(f[1])
		children[pp] = append(children[pp], p)
	}
	var walk func(int)
	var all []int
	walk = func(p int) {
		all = append(all, p)
		for _, ch := range children[p] {
			walk(ch)
		}
	}
	walk(pid)
	sort.Sort(sort.Reverse(sort.IntSlice(all)))
	for _, p := range all {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
}
