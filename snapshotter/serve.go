package snapshotter

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots"
	"google.golang.org/grpc"
)

// socketMode lets root and the socket's group (containerd) connect.
const socketMode = 0o660

// Listen listens on the unix socket at path, mode 0660. It refuses when
// another process is serving on it, and replaces a stale socket file left by
// a process that died.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create directory of socket %s: %w", path, err)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen on %s: file exists and is not a socket", path)
		}
		conn, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			conn.Close()
			return nil, fmt.Errorf("listen on %s: socket is in use by another process (is another streamer-snapshotter running?)", path)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("stat socket %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, socketMode); err != nil {
		l.Close()
		return nil, fmt.Errorf("set mode of socket %s: %w", path, err)
	}
	return l, nil
}

// NewServer returns a gRPC server serving sn as containerd's snapshots API,
// the protocol of a proxy snapshotter plugin.
func NewServer(sn snapshots.Snapshotter, opts ...grpc.ServerOption) *grpc.Server {
	srv := grpc.NewServer(opts...)
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	return srv
}
