package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// CPUUse is the CPU time the parts of the node used over a window (the
// first requests): who else ran while the pods served them.
type CPUUse struct {
	Wall time.Duration
	// By is the CPU time of each part: "pods" (the pods' cgroup), and the
	// processes of "snapshotter", "containerd", "registry" (the registry
	// and the delay proxy) and "bench" (this process, the requests'
	// client).
	By map[string]time.Duration
	// Softirq and Steal are the machine's, from /proc/stat (10 ms ticks:
	// meaningful summed over runs only).
	Softirq, Steal time.Duration
}

// cpuParts names the processes whose CPU time a cpuWatch reads.
type cpuParts map[string][]int

// cpuSample is one reading of a cpuWatch.
type cpuSample struct {
	at             time.Time
	by             map[string]time.Duration
	softirq, steal time.Duration
}

// sampleCPU reads the CPU time of each part and of the pods' cgroup.
func sampleCPU(parts cpuParts) cpuSample {
	s := cpuSample{at: time.Now(), by: map[string]time.Duration{}}
	for name, pids := range parts {
		for _, pid := range pids {
			s.by[name] += threadsCPU(pid)
		}
	}
	if d, ok := podsCPU(); ok {
		s.by["pods"] = d
	}
	s.softirq, s.steal = statTicks()
	return s
}

// cpuBetween is the use from a to b.
func cpuBetween(a, b cpuSample) *CPUUse {
	u := &CPUUse{Wall: b.at.Sub(a.at), By: map[string]time.Duration{},
		Softirq: b.softirq - a.softirq, Steal: b.steal - a.steal}
	for name, d := range b.by {
		if _, ok := a.by[name]; ok {
			u.By[name] = d - a.by[name]
		}
	}
	return u
}

// threadsCPU sums the time on CPU of every thread of pid
// (/proc/PID/task/*/schedstat, nanoseconds); 0 when pid is gone.
func threadsCPU(pid int) time.Duration {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	var sum time.Duration
	for _, t := range tasks {
		data, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		f := strings.Fields(string(data))
		if len(f) == 0 {
			continue
		}
		if ns, err := strconv.ParseInt(f[0], 10, 64); err == nil {
			sum += time.Duration(ns)
		}
	}
	return sum
}

// podsCPU is the CPU time of the pods' cgroup (harness.PodsCgroup's
// parent, kubelet's kubepods), under cgroup v1's cpuacct or the unified
// hierarchy.
func podsCPU() (time.Duration, bool) {
	for _, p := range []string{"/sys/fs/cgroup/cpuacct/kubepods/cpuacct.usage", "/sys/fs/cgroup/cpu,cpuacct/kubepods/cpuacct.usage"} {
		if data, err := os.ReadFile(p); err == nil {
			if ns, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64); err == nil {
				return time.Duration(ns), true
			}
		}
	}
	for _, p := range []string{"/sys/fs/cgroup/kubepods/cpu.stat", "/sys/fs/cgroup/unified/kubepods/cpu.stat"} {
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == "usage_usec" {
				if us, err := strconv.ParseInt(f[1], 10, 64); err == nil {
					return time.Duration(us) * time.Microsecond, true
				}
			}
		}
	}
	return 0, false
}

// statTicks reads the machine's softirq and steal time from /proc/stat.
func statTicks() (softirq, steal time.Duration) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	// cpu user nice system idle iowait irq softirq steal ...
	tick := func(i int) time.Duration {
		if i >= len(f) {
			return 0
		}
		n, _ := strconv.ParseInt(f[i], 10, 64)
		return time.Duration(n) * 10 * time.Millisecond
	}
	return tick(7), tick(8)
}

// FmtCPU writes u for a progress line: each part's CPU time, largest
// first.
func FmtCPU(u *CPUUse) string {
	names := make([]string, 0, len(u.By))
	for name := range u.By {
		names = append(names, name)
	}
	sort.Slice(names, func(i, j int) bool {
		if u.By[names[i]] != u.By[names[j]] {
			return u.By[names[i]] > u.By[names[j]]
		}
		return names[i] < names[j]
	})
	parts := make([]string, 0, len(names)+2)
	for _, name := range names {
		parts = append(parts, fmt.Sprintf("%s %s", name, fmtMs(u.By[name])))
	}
	if u.Softirq > 0 {
		parts = append(parts, "softirq "+fmtMs(u.Softirq))
	}
	if u.Steal > 0 {
		parts = append(parts, "steal "+fmtMs(u.Steal))
	}
	return fmt.Sprintf("%s over %s", strings.Join(parts, ", "), fmtMs(u.Wall))
}

// fmtMs prints d in milliseconds to a tenth.
func fmtMs(d time.Duration) string {
	return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
}
