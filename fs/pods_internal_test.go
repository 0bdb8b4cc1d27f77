package fs

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestReadUsage(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name, body string
		v2         bool
		want       time.Duration
		err        string
	}{
		{"v1", "1234567890\n", false, 1234567890, ""},
		{"v2", "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n", true, 2500 * time.Microsecond, ""},
		{"v2-late", "nr_periods 0\nusage_usec 7\n", true, 7 * time.Microsecond, ""},
		{"v1-garbage", "lots\n", false, 0, "read CPU time of"},
		{"v2-none", "user_usec 2000\n", true, 0, "no usage_usec"},
	}
	for _, tt := range tests {
		got, err := readUsage(write(tt.name, tt.body), tt.v2)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%s: err %v, want %q", tt.name, err, tt.err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%s: %v, %v; want %v", tt.name, got, err, tt.want)
		}
	}
	if _, err := readUsage(filepath.Join(dir, "missing"), false); err == nil {
		t.Error("missing file: no error")
	}
}

// TestPodWatchFindsCgroup: names are looked for under the v1 cpuacct
// hierarchy and the unified one, in order; a cgroup created later is found
// on a later look; none configured, or a share of 0, is no watch.
func TestPodWatchFindsCgroup(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "cpuacct", "kubepods"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "cpuacct", "kubepods", "cpuacct.usage"), []byte("5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	w := newPodWatch(podWatchOptions{cgroups: []string{"kubepods.slice", "kubepods"}, root: root, share: 0.25})
	w.findLocked(time.Now())
	if want := filepath.Join(root, "cpuacct", "kubepods", "cpuacct.usage"); w.file != want || w.v2 {
		t.Errorf("found %q (v2 %v), want %q", w.file, w.v2, want)
	}

	w = newPodWatch(podWatchOptions{cgroups: []string{"kubepods.slice"}, root: root, share: 0.25})
	w.findLocked(time.Now())
	if w.file != "" {
		t.Fatalf("found %q for a cgroup that is not there", w.file)
	}
	if err := os.MkdirAll(filepath.Join(root, "kubepods.slice"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "kubepods.slice", "cpu.stat"), []byte("usage_usec 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	w.findLocked(time.Now())
	if w.file != "" {
		t.Errorf("looked again before %v", podFind)
	}
	w.findLocked(time.Now().Add(podFind))
	if want := filepath.Join(root, "kubepods.slice", "cpu.stat"); w.file != want || !w.v2 {
		t.Errorf("found %q (v2 %v) after it was created, want %q", w.file, w.v2, want)
	}

	if newPodWatch(podWatchOptions{share: 0.25}) != nil || newPodWatch(podWatchOptions{cgroups: []string{"kubepods"}}) != nil {
		t.Error("a watch with no cgroup or no share is not off")
	}
	var off *podWatch
	off.wait(t.Context(), time.Second) // a nil watch never waits
	if off.waitedFor() != 0 {
		t.Error("nil watch waited")
	}
}

// TestPodWatchAverage: with the pods' CPU time read from a file the test
// writes, the last sample holds background work while the pods are busy;
// after a busy startup the average keeps it back for about half a second
// (1 s window, one CPU busy for 2 s, a limit of half a CPU); a 10 ms burst
// on an idle node holds it for that sample only.
func TestPodWatchAverage(t *testing.T) {
	file := filepath.Join(t.TempDir(), "cpuacct.usage")
	w := newPodWatch(podWatchOptions{cgroups: []string{filepath.Dir(file)}, share: 0.25, cpus: 2, window: time.Second})
	var usage time.Duration
	at := time.Now()
	sample := func(d time.Duration, cpus float64) (now, hold bool) {
		t.Helper()
		at = at.Add(d)
		usage += time.Duration(float64(d) * cpus)
		if err := os.WriteFile(file, []byte(strconv.FormatInt(int64(usage), 10)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		w.file = file
		if !w.sampleLocked(at) {
			t.Fatal("sample failed")
		}
		return w.stateLocked()
	}
	sample(0, 0)
	if now, hold := sample(10*time.Millisecond, 0.1); now || hold {
		t.Errorf("idle pods: now %v hold %v", now, hold)
	}
	for range 200 { // a startup: one CPU for 2 s
		if now, hold := sample(10*time.Millisecond, 1); !now || !hold {
			t.Fatalf("busy pods: now %v hold %v", now, hold)
		}
	}
	var held time.Duration
	for {
		now, hold := sample(10*time.Millisecond, 0)
		if now {
			t.Fatal("idle sample seen busy")
		}
		if !hold {
			break
		}
		held += 10 * time.Millisecond
	}
	if held < 400*time.Millisecond || held > 700*time.Millisecond {
		t.Errorf("held %v after a 2 s startup; want about ln(0.86/0.5) s", held)
	}
	for range 500 { // idle 5 s
		sample(10*time.Millisecond, 0)
	}
	if now, hold := sample(10*time.Millisecond, 2); !now || !hold {
		t.Errorf("burst: now %v hold %v; want held for the sample", now, hold)
	}
	if now, hold := sample(10*time.Millisecond, 0); now || hold {
		t.Errorf("after a 10 ms burst: now %v hold %v; want free", now, hold)
	}
}
