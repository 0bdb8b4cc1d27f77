package harness

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// CPU groups: on a kubelet node the pods do not compete for the CPUs
// thread by thread with the node's daemons. kubelet gives its pods' cgroup
// (kubepods) cpu.shares of 1024 per allocatable CPU and BestEffort pods 2
// within it; containerd, a snapshotter and kubelet itself run in
// system.slice, at systemd's default of 1024. Started from a shell, every
// daemon thread sits in the root cgroup and weighs as much as all the pods
// together, which a node never does. NodeCPU sets up that layout, so
// that a benchmark's CPU contention is a node's.

// keptCgroups are cgroup directories removePodCgroup leaves in place
// (NodeCPU's kubepods and besteffort, which carry their shares).
var keptCgroups sync.Map

// CPUGroup is a cgroup of the CPU controller that processes can be moved
// into.
type CPUGroup struct {
	dir string
}

// Add moves every thread of pid into the group; the process's children
// started afterwards are born in it.
func (g *CPUGroup) Add(pid int) error {
	if g == nil {
		return nil
	}
	if err := os.WriteFile(filepath.Join(g.dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		return fmt.Errorf("move process %d into cgroup %s: %w", pid, g.dir, err)
	}
	return nil
}

// NodeCPU is the kubelet-like layout of the CPU controller NewNodeCPU made.
type NodeCPU struct {
	// System is the node's daemons' group (containerd, the snapshotter):
	// system.slice.
	System *CPUGroup
	// Remote holds what runs on this machine only for want of another one
	// (a benchmark's registry, its storage and the link's delay proxies):
	// one group at the lowest weight (cpu.shares 2), so that it runs on
	// what CPU the node leaves idle and takes from the node's own work
	// only a sliver when the CPUs are busy, as a registry on another
	// machine takes nothing. When the pods keep both CPUs busy it is
	// served last, which can slow what the node fetches meanwhile: that
	// costs a lazy start, never a full pull (whose download ends before
	// its container starts).
	Remote *CPUGroup
	// Shares says what was set, for reports.
	Shares string
}

// cpuRoot finds the CPU controller's hierarchy: cgroup v1's cpu (or
// cpu,cpuacct) mount, or the unified hierarchy when it has the cpu
// controller. v2 is true for the unified one (cpu.weight instead of
// cpu.shares).
func cpuRoot() (root string, v2 bool, err error) {
	for _, d := range []string{"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"} {
		if _, err := os.Stat(filepath.Join(d, "cpu.shares")); err == nil {
			return d, false, nil
		}
	}
	for _, d := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		data, err := os.ReadFile(filepath.Join(d, "cgroup.subtree_control"))
		if err != nil {
			continue
		}
		if slices.Contains(strings.Fields(string(data)), "cpu") {
			return d, true, nil
		}
		// Enable it for the children, as systemd does on a v2 node.
		if ctrl, err := os.ReadFile(filepath.Join(d, "cgroup.controllers")); err == nil && slices.Contains(strings.Fields(string(ctrl)), "cpu") {
			if err := os.WriteFile(filepath.Join(d, "cgroup.subtree_control"), []byte("+cpu"), 0o644); err == nil {
				return d, true, nil
			}
		}
	}
	return "", false, errors.New("no cgroup CPU controller: neither cgroup v1's cpu hierarchy nor a unified hierarchy with the cpu controller under /sys/fs/cgroup")
}

// sharesToWeight converts cgroup v1 cpu.shares to v2 cpu.weight as kubelet
// and runc do.
func sharesToWeight(shares int) int {
	if shares < 2 {
		shares = 2
	}
	return 1 + ((shares-2)*9999)/262142
}

// NewNodeCPU lays the CPU controller out as a kubelet node's: kubepods
// (the parent of PodsCgroup) with cpu.shares 1024 per CPU of this machine,
// kubepods/besteffort with 2, System at 1024 and Remote at 2 (cpu.weight
// converted on cgroup v2). The groups it made are removed on cleanup
// (their processes moved back to the root first); pods' cgroups under
// kubepods are still removed with their pods, but kubepods and besteffort
// stay until then.
func NewNodeCPU(t TB, prefix string) (*NodeCPU, error) {
	t.Helper()
	return newNodeCPU(t, prefix, PodsCgroup)
}

// newNodeCPU is NewNodeCPU with the BestEffort pods' cgroup podsCgroup
// (tests use their own, beside other tests' pods).
func newNodeCPU(t TB, prefix, podsCgroup string) (*NodeCPU, error) {
	root, v2, err := cpuRoot()
	if err != nil {
		return nil, err
	}
	var made []string
	t.Cleanup(func() {
		for i := len(made) - 1; i >= 0; i-- {
			d := made[i]
			keptCgroups.Delete(d)
			if data, err := os.ReadFile(filepath.Join(d, "cgroup.procs")); err == nil {
				for _, pid := range strings.Fields(string(data)) {
					_ = os.WriteFile(filepath.Join(root, "cgroup.procs"), []byte(pid), 0o644)
				}
			}
			// A run cut short (an interrupted bench) can leave a pod's
			// cgroup below, empty once its processes have exited.
			err := os.Remove(d)
			for try := 0; errors.Is(err, syscall.EBUSY) && try < 20; try++ {
				time.Sleep(100 * time.Millisecond)
				removeEmptyBelow(d)
				err = os.Remove(d)
			}
			if err != nil && !os.IsNotExist(err) {
				t.Logf("remove cgroup %s: %v", d, err)
			}
		}
	})
	group := func(rel string, shares int) (string, error) {
		d := filepath.Join(root, rel)
		if err := os.Mkdir(d, 0o755); err == nil {
			made = append(made, d)
		} else if !os.IsExist(err) {
			return "", fmt.Errorf("make cgroup %s: %w", d, err)
		}
		file, val := "cpu.shares", strconv.Itoa(shares)
		if v2 {
			file, val = "cpu.weight", strconv.Itoa(sharesToWeight(shares))
		}
		if err := os.WriteFile(filepath.Join(d, file), []byte(val), 0o644); err != nil {
			return "", fmt.Errorf("set %s of cgroup %s to %s: %w", file, d, val, err)
		}
		return d, nil
	}
	podShares := 1024 * runtime.NumCPU()
	pods, err := group(filepath.Dir(podsCgroup), podShares)
	if err != nil {
		return nil, err
	}
	keptCgroups.Store(pods, true)
	be, err := group(podsCgroup, 2)
	if err != nil {
		return nil, err
	}
	keptCgroups.Store(be, true)
	sys, err := group(prefix+"-system", 1024)
	if err != nil {
		return nil, err
	}
	remote, err := group(prefix+"-remote", 2)
	if err != nil {
		return nil, err
	}
	unit := "cpu.shares"
	if v2 {
		unit = "cpu.weight (from cpu.shares as kubelet converts them)"
	}
	return &NodeCPU{
		System: &CPUGroup{dir: sys},
		Remote: &CPUGroup{dir: remote},
		Shares: fmt.Sprintf("%s: pods (kubepods) %d, BestEffort within them 2, containerd and the snapshotter 1024, registry side 2", unit, podShares),
	}, nil
}

// removeEmptyBelow removes the cgroups below d, deepest first, that hold
// no process; the kernel refuses the others.
func removeEmptyBelow(d string) {
	ents, err := os.ReadDir(d)
	if err != nil {
		return
	}
	for _, e := range ents {
		if e.IsDir() {
			sub := filepath.Join(d, e.Name())
			removeEmptyBelow(sub)
			_ = os.Remove(sub)
		}
	}
}
