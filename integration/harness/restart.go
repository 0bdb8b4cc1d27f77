package harness

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Restarting daemons on their own state, as an upgrade or a crash does on
// a node: containerd with its root and state directories, the snapshotter
// with its root (Snapshotter.Start).

// PID is the running daemon's process id.
func (c *Containerd) PID() int { return c.proc.PID() }

// Stop stops the daemon alone, as `systemctl stop containerd` does with the
// unit's KillMode=process: SIGTERM, then SIGKILL after grace. Shims,
// containers and mounts stay. It reports whether the daemon exited within
// grace.
func (c *Containerd) Stop(grace time.Duration) bool { return c.proc.Stop(grace) }

// Kill kills the daemon alone with SIGKILL, as a crash would; shims,
// containers and mounts stay.
func (c *Containerd) Kill() { c.proc.Kill() }

// Start starts the daemon again with the same config, root and state
// (after Stop or Kill) and waits until its CRI API answers.
func (c *Containerd) Start() error {
	if ok, _ := c.proc.Exited(); !ok {
		return fmt.Errorf("start containerd: pid %d still runs", c.proc.PID())
	}
	proc, err := StartProcess(c.Binary, c.proc.LogPath, "--config", c.ConfigPath)
	if err != nil {
		return err
	}
	c.proc = proc
	if err := c.cpuGroup.Add(proc.PID()); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := c.waitCRI(ctx); err != nil {
		return fmt.Errorf("restart containerd: %w\nlog tail:\n%s", err, c.proc.LogTail(40))
	}
	return nil
}

// waitCRI waits until the daemon's CRI API answers and records the version
// it reports.
func (c *Containerd) waitCRI(ctx context.Context) error {
	return WaitFor(ctx, c.proc, "containerd CRI "+c.Address, func(ctx context.Context) error {
		if err := DialUnix(ctx, c.Address); err != nil {
			return err
		}
		cri, err := DialCRI(ctx, c.Address)
		if err != nil {
			return err
		}
		defer cri.Close()
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
		defer ccancel()
		v, err := cri.Runtime.Version(cctx, &runtime.VersionRequest{})
		if err != nil {
			return err
		}
		c.Version = v.RuntimeVersion
		return nil
	})
}

// Snapshots lists the snapshots as the daemon itself knows them, asked on
// its socket (names are containerd's backend keys, labels include the
// daemon's own, such as the remote-layer label).
func (s *Snapshotter) Snapshots(ctx context.Context) ([]snapshots.Info, error) {
	conn, err := grpc.DialContext(ctx, "unix://"+s.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dial snapshotter %s: %w", s.Address, err)
	}
	defer conn.Close()
	var out []snapshots.Info
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "streamer")
	if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		out = append(out, info)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("list snapshots of %s: %w", s.Address, err)
	}
	return out, nil
}

// ErrMountHung is returned by StatfsMount when a mount does not answer in
// time (a FUSE mount nobody serves).
var ErrMountHung = errors.New("mount does not answer")

// StatfsMount asks statfs of the mount at mp in a child process bounded by
// timeout, so a FUSE mount whose server is gone cannot hang the caller. It
// fails on any error (ENOTCONN for an aborted connection) and wraps
// ErrMountHung when no answer came.
func StatfsMount(ctx context.Context, mp string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "stat", "-f", "-c", "%T", mp)
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return fmt.Errorf("statfs %s: no answer within %v: %w", mp, timeout, ErrMountHung)
	}
	if err != nil {
		return fmt.Errorf("statfs %s: %w: %s", mp, err, strings.TrimSpace(string(out)))
	}
	return nil
}
