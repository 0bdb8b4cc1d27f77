// Package harness runs Streamer end to end on one machine: it builds test
// images as OCI layouts, starts a registry, the snapshotter and containerd as
// real processes, and drives containerd's CRI API the way kubelet does. The
// integration tests and the demo (integration/cmd/demo) share it.
package harness

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
)

// TB is the part of *testing.T the harness needs. Fatalf must not return.
// The demo implements it with Runner.
type TB interface {
	Helper()
	Logf(format string, args ...any)
	Fatalf(format string, args ...any)
	Cleanup(func())
	Failed() bool
}

// ShortTempDir makes a temporary directory with a short path under /tmp
// (unix socket paths are limited to 108 bytes) and removes it on cleanup.
// Cleanups run in reverse order, so register it before anything that mounts
// or runs inside it.
func ShortTempDir(t TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatalf("make temp dir: %v", err)
	}
	t.Cleanup(func() {
		UnmountAll(t, dir)
		if err := os.RemoveAll(dir); err != nil {
			t.Logf("remove %s: %v", dir, err)
		}
	})
	return dir
}

// Runner implements TB outside tests (the demo): Fatalf logs and panics
// with a value Run recovers, and Run always runs the cleanups.
type Runner struct {
	running  sync.Mutex // held while cleanups run, so they never run twice at once
	mu       sync.Mutex
	cleanups []func()
	failed   bool
	// Log receives every message; it defaults to standard error.
	Log func(msg string)
}

type fatal struct{ msg string }

// Helper does nothing; it exists to satisfy TB.
func (r *Runner) Helper() {}

// Logf prints a message.
func (r *Runner) Logf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if r.Log != nil {
		r.Log(msg)
		return
	}
	fmt.Fprintln(os.Stderr, msg)
}

// Fatalf marks the run failed and stops it (Run recovers).
func (r *Runner) Fatalf(format string, args ...any) {
	r.mu.Lock()
	r.failed = true
	r.mu.Unlock()
	panic(fatal{msg: fmt.Sprintf(format, args...)})
}

// Cleanup registers f to run, last registered first, when Run returns.
func (r *Runner) Cleanup(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cleanups = append(r.cleanups, f)
}

// Failed reports whether Fatalf was called.
func (r *Runner) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

// Run calls f and then every cleanup; it returns the Fatalf message as an
// error, or f's error.
func (r *Runner) Run(f func() error) (err error) {
	defer r.RunCleanups()
	defer func() {
		if v := recover(); v != nil {
			if ft, ok := v.(fatal); ok {
				err = fmt.Errorf("%s", ft.msg)
				return
			}
			panic(v)
		}
	}()
	return f()
}

// RunCleanups runs the registered cleanups once, last registered first.
// It is safe to call from a signal handler goroutine: a concurrent call waits
// for the first to finish.
func (r *Runner) RunCleanups() {
	r.running.Lock()
	defer r.running.Unlock()
	for {
		r.mu.Lock()
		n := len(r.cleanups)
		if n == 0 {
			r.mu.Unlock()
			return
		}
		f := r.cleanups[n-1]
		r.cleanups = r.cleanups[:n-1]
		r.mu.Unlock()
		func() {
			defer func() {
				if v := recover(); v != nil {
					r.Logf("cleanup: %v", v)
				}
			}()
			f()
		}()
	}
}

// RunProgram runs fn as a program's main does: with a Runner logging to
// standard error, and SIGINT or SIGTERM stopping it, removing everything
// it started and exiting with 130. It returns fn's error once cleanup is done.
func RunProgram(name string, fn func(r *Runner) error) error {
	r := &Runner{Log: func(msg string) { fmt.Fprintln(os.Stderr, "    "+strings.ReplaceAll(msg, "\n", "\n    ")) }}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	var interrupted atomic.Bool
	go func() {
		s := <-sigs
		interrupted.Store(true)
		fmt.Fprintf(os.Stderr, "\n%s: stopping and removing everything\n", s)
		r.RunCleanups()
		fmt.Fprintf(os.Stderr, "%s interrupted; everything stopped and removed\n", name)
		os.Exit(130)
	}()
	err := r.Run(func() error { return fn(r) })
	if interrupted.Load() {
		select {} // the signal handler finishes the cleanup and exits
	}
	return err
}
