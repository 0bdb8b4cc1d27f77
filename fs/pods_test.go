package fs_test

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/streamer-dev/streamer/fs"
)

// podsCgroup creates a cgroup of its own with CPU accounting (v1 cpuacct,
// or the unified hierarchy) for the pods of a test, removed at the end.
func podsCgroup(t *testing.T) string {
	t.Helper()
	var root string
	switch {
	case fileExists("/sys/fs/cgroup/cpuacct/cpuacct.usage"):
		root = "/sys/fs/cgroup/cpuacct"
	case fileExists("/sys/fs/cgroup/cgroup.controllers"):
		root = "/sys/fs/cgroup"
	default:
		t.Skip("SKIPPED LOUDLY: no cgroup hierarchy with CPU accounting at /sys/fs/cgroup: the pods watch cannot be tested here")
	}
	dir := filepath.Join(root, fmt.Sprintf("streamer-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skipf("SKIPPED LOUDLY: cannot create a cgroup (%v): the pods watch needs root", err)
	}
	t.Cleanup(func() {
		if err := os.Remove(dir); err != nil {
			t.Errorf("remove test cgroup: %v", err)
		}
	})
	return dir
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// spin starts a process using a whole CPU in cgroup dir; stop kills it
// (also done at the end of the test).
func spin(t *testing.T, dir string) (stop func()) {
	t.Helper()
	cmd := exec.Command("sh", "-c", "while :; do :; done")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cmd.Process.Kill()
			cmd.Wait()
		}
	}
	t.Cleanup(stop)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		t.Fatalf("move the busy process into the pods' cgroup: %v", err)
	}
	return stop
}

// TestBackgroundYieldsToBusyPods: while a process of the pods' cgroup
// uses a CPU, the background fetch slows down to its floor (a run per
// 500 ms of busy pods, per worker) but goes on, while files still read
// at once; once the process stops, the fetch goes on at full speed after
// the pods' average use has come down, and the layer completes.
func TestBackgroundYieldsToBusyPods(t *testing.T) {
	cg := podsCgroup(t)
	e := newManagerEnv(t)
	want := files{"app/a.bin": randomBytes(501, 24<<20), "app/b.txt": []byte("b\n")}
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/yield", want.tar(t), true)
	m := e.managerWith(t, nil, func(o *fs.ManagerOptions) {
		o.MaxCoalesce = 4 << 20
		o.BackgroundConcurrency = 1
		o.YieldCgroups = []string{"no-such-cgroup", cg}
		// A twentieth of the CPUs: the busy process stays above it even
		// when other tests load the machine.
		o.YieldCPU = 0.05
		o.YieldWindow = 300 * time.Millisecond
	})
	stop := spin(t, cg)
	time.Sleep(50 * time.Millisecond) // the process runs before the mount

	dir := managerMount(t, m, img.labels())
	// A read is never held back: on-demand fetches do not wait.
	start := time.Now()
	if got, err := readWithin(t, filepath.Join(dir, "app/b.txt"), 10*time.Second); err != nil || !bytes.Equal(got, want["app/b.txt"]) {
		t.Fatalf("read while the pods are busy: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("a read while the pods are busy took %v", d)
	}
	time.Sleep(1500 * time.Millisecond)
	// One worker, a run of 4 MiB per 500 ms of busy pods: about 12 MiB
	// in 1.5 s; with the pods idle the 24 MiB take a fraction of that.
	st := m.Stats()
	if st.BackgroundBytes == 0 || st.BackgroundBytes > 20<<20 {
		t.Errorf("background fetch read %d bytes in 1.5 s of busy pods; want some (it slows down, never stops), at most 20 MiB", st.BackgroundBytes)
	}
	if st.YieldedToPods < time.Second {
		t.Errorf("yielded to pods for %v; want about 1.5 s", st.YieldedToPods)
	}
	if s, _ := layerStatus(m, img.layer); s.Complete {
		t.Fatal("layer complete while the pods were busy")
	}

	stop()
	stopped := time.Now()
	s := waitStatus(t, m, img.layer, 20*time.Second, "complete", isComplete)
	if d := s.CompletedAt.Sub(stopped); d > 5*time.Second {
		t.Errorf("layer complete %v after the pods went idle", d)
	}
	readAll(t, dir, want)
}
