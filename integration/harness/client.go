package harness

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
)

// CRINamespace is the containerd namespace the CRI plugin uses.
const CRINamespace = "k8s.io"

// Client connects containerd's Go client to the daemon; it closes on cleanup.
func (c *Containerd) Client(t TB) *containerd.Client {
	t.Helper()
	cl, err := containerd.New(c.Address, containerd.WithDefaultNamespace(CRINamespace))
	if err != nil {
		t.Fatalf("containerd client: %v", err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// PullUnpacked pulls ref (plain HTTP) into namespace ns and unpacks it with
// the named snapshotter, the way `ctr image pull --snapshotter` does.
func PullUnpacked(ctx context.Context, cl *containerd.Client, ns, ref, snapshotter string) (containerd.Image, error) {
	ctx = namespaces.WithNamespace(ctx, ns)
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts)),
	})
	img, err := cl.Pull(ctx, ref, containerd.WithResolver(resolver), containerd.WithPullUnpack, containerd.WithPullSnapshotter(snapshotter))
	if err != nil {
		return nil, fmt.Errorf("pull %s with %s: %w", ref, snapshotter, err)
	}
	return img, nil
}

// ChainID is the snapshot name of an image's top layer.
func ChainID(diffIDs []digest.Digest) digest.Digest { return identity.ChainID(diffIDs) }

// MountView makes a read-only view of the committed snapshot chainID with
// the named snapshotter and mounts it at dir. The returned function
// unmounts it and removes the view; it is also registered as a cleanup.
func MountView(t TB, ctx context.Context, cl *containerd.Client, ns, snapshotter string, chainID digest.Digest, dir string) func() {
	t.Helper()
	ctx = namespaces.WithNamespace(ctx, ns)
	sn := cl.SnapshotService(snapshotter)
	key := fmt.Sprintf("harness-view-%s-%d", chainID.Encoded()[:12], os.Getpid())
	mounts, err := sn.View(ctx, key, chainID.String())
	if err != nil {
		t.Fatalf("view %s with %s: %v", chainID, snapshotter, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("%v", err)
	}
	if err := mount.All(mounts, dir); err != nil {
		_ = sn.Remove(ctx, key)
		t.Fatalf("mount view %s (%v) at %s: %v", chainID, mounts, dir, err)
	}
	done := false
	undo := func() {
		if done {
			return
		}
		done = true
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Logf("unmount view %s: %v", dir, err)
		}
		rctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), 30*time.Second)
		defer cancel()
		if err := sn.Remove(rctx, key); err != nil {
			t.Logf("remove view %s: %v", key, err)
		}
	}
	t.Cleanup(undo)
	return undo
}
