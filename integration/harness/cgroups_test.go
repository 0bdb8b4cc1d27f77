package harness

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// TestNodeCPU: NewNodeCPU gives kubepods 1024 shares per CPU and the
// daemons' group 1024, moves a process into a group, keeps kubepods when
// a pod's cgroup goes, and removes everything it made at the end, moving
// what is left in it back to the root.
func TestNodeCPU(t *testing.T) {
	root, v2, err := cpuRoot()
	if err != nil {
		t.Skipf("SKIPPED LOUDLY: %v", err)
	}
	// Its own kubepods: other packages' tests run pods under the real one
	// meanwhile.
	prefix := "streamer-test-" + strconv.Itoa(os.Getpid())
	besteffort := "/" + prefix + "-kubepods/besteffort"
	pods := filepath.Join(root, filepath.Dir(besteffort))
	sleep := exec.Command("sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sleep.Process.Kill(); _ = sleep.Wait() }()

	r := &Runner{Log: func(msg string) { t.Log(msg) }}
	var sys string
	if err := r.Run(func() error {
		c, err := newNodeCPU(r, prefix, besteffort)
		if err != nil {
			return err
		}
		sys = c.System.dir
		file, want := "cpu.shares", strconv.Itoa(1024*runtime.NumCPU())
		if v2 {
			file, want = "cpu.weight", strconv.Itoa(sharesToWeight(1024*runtime.NumCPU()))
		}
		if got := readTrim(t, filepath.Join(pods, file)); got != want {
			t.Errorf("kubepods %s = %s, want %s", file, got, want)
		}
		if err := c.System.Add(sleep.Process.Pid); err != nil {
			return err
		}
		if procs := readTrim(t, filepath.Join(sys, "cgroup.procs")); procs != strconv.Itoa(sleep.Process.Pid) {
			t.Errorf("system group holds %q, want the sleep process %d", procs, sleep.Process.Pid)
		}
		pod := besteffort + "/podtest"
		if err := os.Mkdir(filepath.Join(root, pod), 0o755); err != nil {
			return err
		}
		removePodCgroup(pod)
		if _, err := os.Stat(filepath.Join(root, pod)); !os.IsNotExist(err) {
			t.Errorf("pod cgroup still there after removePodCgroup: %v", err)
		}
		if _, err := os.Stat(filepath.Join(root, besteffort)); err != nil {
			t.Errorf("removePodCgroup removed the kept %s: %v", besteffort, err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{pods, sys} {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s left after cleanup: %v", d, err)
		}
	}
	data, err := os.ReadFile("/proc/" + strconv.Itoa(sleep.Process.Pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(data), "streamer-test-") {
		t.Errorf("the process is still in a test group after cleanup:\n%s", data)
	}
}

func readTrim(t *testing.T, p string) string {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(data))
}
