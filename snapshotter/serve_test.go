package snapshotter

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func mkdirOf(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
}

func TestListen(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, path string)
		wantErr string
	}{
		{"new socket in a new directory", func(t *testing.T, path string) {}, ""},
		{"stale socket of a dead process", func(t *testing.T, path string) {
			mkdirOf(t, path)
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
		}, ""},
		{"socket in use", func(t *testing.T, path string) {
			mkdirOf(t, path)
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}, "in use by another process"},
		{"not a socket", func(t *testing.T, path string) {
			mkdirOf(t, path)
			if err := os.WriteFile(path, nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}, "not a socket"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "run")
			path := filepath.Join(dir, "s.sock")
			tt.setup(t, path)
			l, err := Listen(path)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Listen: got %v, want an error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Listen: %v", err)
			}
			defer l.Close()
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != 0o660 {
				t.Errorf("socket mode = %v, want 0660", st.Mode().Perm())
			}
		})
	}
}

// TestServeRemoteProtocol checks the remote-snapshot answer survives the
// gRPC edge: containerd's proxy sees ErrAlreadyExists.
func TestServeRemoteProtocol(t *testing.T) {
	e := newEnv(t, twoLayers)
	ctx := testContext(t)
	sn := e.open(t, ctx, newBindFS(e.layers))
	t.Cleanup(func() { sn.Close() })

	sock := filepath.Join(t.TempDir(), "sn.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(sn)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)

	conn, err := grpc.DialContext(ctx, "unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	client := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "streamer")

	_, err = client.Prepare(ctx, "extract-chain-a", "", layerLabels("chain-a", "sha256:a"))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("remote Prepare over gRPC: got %v, want ErrAlreadyExists", err)
	}
	info, err := client.Stat(ctx, "chain-a")
	if err != nil || info.Labels[LabelRemote] != "true" {
		t.Fatalf("Stat over gRPC: %+v, %v", info, err)
	}
	mounts, err := client.Prepare(ctx, "container", "chain-a")
	if err != nil {
		t.Fatalf("Prepare over gRPC: %v", err)
	}
	assertFiles(t, readMerged(t, mounts, "a"), map[string]string{"a": "A"})
	if _, err := client.Stat(ctx, "missing"); !errdefs.IsNotFound(err) {
		t.Errorf("Stat of a missing snapshot: got %v, want ErrNotFound", err)
	}
}
