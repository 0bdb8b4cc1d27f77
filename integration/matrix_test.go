package integration

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/streamer-dev/streamer/integration/harness"
)

// The compatibility matrix: every node test runs on each containerd below,
// as a subtest named after it (TestNodeLazy/containerd-1.7). The whole
// integration package takes about 45 s with 1.6 alone and about 75 s with
// both on the development machine (docs/compatibility.md), so every node
// test runs on both. `go test -run 'TestNode/containerd-1.6'` runs one.
var containerdMatrix = []struct {
	name    string
	runtime func(t *testing.T) harness.ContainerdRuntime
}{
	{"containerd-1.6", systemContainerd},
	{"containerd-1.7", builtContainerd17},
}

// forEachContainerd runs body once per containerd of the matrix.
func forEachContainerd(t *testing.T, body func(t *testing.T, rt harness.ContainerdRuntime)) {
	t.Helper()
	for _, c := range containerdMatrix {
		t.Run(c.name, func(t *testing.T) {
			needRoot(t)
			rt := c.runtime(t)
			if rt.Name != c.name {
				t.Fatalf("the matrix entry %s runs %s (%s)", c.name, rt.Name, rt.Binary)
			}
			body(t, rt)
		})
	}
}

var (
	systemOnce    sync.Once
	systemRuntime harness.ContainerdRuntime
	systemErr     error
)

// systemContainerd is the node's own containerd (Debian's 1.6, or
// $STREAMER_CONTAINERD), named after the version it reports.
func systemContainerd(t *testing.T) harness.ContainerdRuntime {
	t.Helper()
	systemOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var v string
		v, systemErr = harness.ContainerdVersion(ctx, os.Getenv(harness.EnvContainerd))
		systemRuntime = harness.SystemContainerd
		systemRuntime.Name = "containerd-" + harness.MajorMinor(v)
	})
	if systemErr != nil {
		t.Fatalf("system containerd: %v", systemErr)
	}
	return systemRuntime
}

var (
	c17Once    sync.Once
	c17Runtime harness.ContainerdRuntime
	c17Err     error
)

// builtContainerd17 builds containerd 1.7 from the Go module the first
// time a test needs it (cached across runs: harness.BuildContainerd17).
func builtContainerd17(t *testing.T) harness.ContainerdRuntime {
	t.Helper()
	c17Once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		start := time.Now()
		c17Runtime, c17Err = harness.BuildContainerd17(ctx)
		t.Logf("containerd 1.7 ready in %v: %s", time.Since(start).Round(time.Millisecond), c17Runtime.Binary)
	})
	if c17Err != nil {
		t.Fatalf("containerd 1.7 did not build: %v", c17Err)
	}
	return c17Runtime
}
