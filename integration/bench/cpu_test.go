package bench

import (
	"os"
	"strings"
	"testing"
	"time"
)

func TestSampleCPUCountsThisProcess(t *testing.T) {
	parts := cpuParts{"bench": {os.Getpid()}, "gone": {1 << 30}}
	a := sampleCPU(parts)
	spin := time.Now()
	for time.Since(spin) < 50*time.Millisecond {
	}
	u := cpuBetween(a, sampleCPU(parts))
	if got := u.By["bench"]; got < 30*time.Millisecond || got > u.Wall*time.Duration(2+1) {
		t.Errorf("CPU time of this process over a 50 ms spin: %v (wall %v)", got, u.Wall)
	}
	if got := u.By["gone"]; got != 0 {
		t.Errorf("CPU time of a process that does not exist: %v, want 0", got)
	}
	line := FmtCPU(u)
	if !strings.HasPrefix(line, "bench ") || !strings.Contains(line, " over ") {
		t.Errorf("FmtCPU = %q, want the largest part first and the wall time", line)
	}
}
