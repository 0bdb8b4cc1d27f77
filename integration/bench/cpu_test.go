package bench

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rusageCPU is this process's CPU time by the kernel's own account.
func rusageCPU(t *testing.T) time.Duration {
	t.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestSampleCPUCountsThisProcess: the CPU time read for a process matches
// the kernel's rusage over a spin of at least 50 ms of CPU (however long
// that takes on a loaded machine); a process that does not exist counts 0.
func TestSampleCPUCountsThisProcess(t *testing.T) {
	parts := cpuParts{"bench": {os.Getpid()}, "gone": {1 << 30}}
	r0 := rusageCPU(t)
	a := sampleCPU(parts)
	for start := time.Now(); rusageCPU(t)-r0 < 50*time.Millisecond && time.Since(start) < 10*time.Second; {
	}
	u := cpuBetween(a, sampleCPU(parts))
	want := rusageCPU(t) - r0
	if got := u.By["bench"]; got < 40*time.Millisecond || got < want*9/10-5*time.Millisecond || got > want*11/10+5*time.Millisecond {
		t.Errorf("CPU time of this process over a spin: %v, rusage says %v (wall %v)", got, want, u.Wall)
	}
	if got := u.By["gone"]; got != 0 {
		t.Errorf("CPU time of a process that does not exist: %v, want 0", got)
	}
	line := FmtCPU(u)
	if !strings.HasPrefix(line, "bench ") || !strings.Contains(line, " over ") {
		t.Errorf("FmtCPU = %q, want the largest part first and the wall time", line)
	}
}
