package snapshotter

import (
	"testing"

	"golang.org/x/sys/unix"
)

// A daemon killed between mounting a layer and committing it leaves the
// mount on an active snapshot that containerd never got: the next daemon
// clears it at start (a FUSE mount there would be served by no one).
func TestRestoreClearsInterruptedPrepare(t *testing.T) {
	e := newEnv(t, twoLayers)
	ctx := testContext(t)
	sn1 := e.open(t, ctx, newBindFS(e.layers))
	prepareRemote(t, ctx, sn1, "chain-a", "", "sha256:a")
	if _, err := sn1.Prepare(ctx, "extract-chain-b", "chain-a"); err != nil {
		t.Fatal(err)
	}
	mpA := sn1.mountpointOf(t, ctx, "chain-a")
	interrupted := sn1.mountpointOf(t, ctx, "extract-chain-b")
	// What fs.Mount did before the kill, on the active snapshot's directory.
	if err := unix.Mount(e.layers["sha256:b"], interrupted, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	// Crash: no Close.
	if err := sn1.ms.Close(); err != nil {
		t.Fatal(err)
	}
	sn1.lock.Close()

	sn := e.open(t, ctx, newBindFS(e.layers))
	t.Cleanup(func() { sn.Close() })
	assertMounted(t, interrupted, false)
	assertMounted(t, mpA, true)
	// The snapshot itself is containerd's to remove.
	if err := sn.Remove(ctx, "extract-chain-b"); err != nil {
		t.Fatalf("remove the interrupted snapshot: %v", err)
	}
}
