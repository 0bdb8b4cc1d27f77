// Command containerd-shim-runc-v2 is containerd 1.7's runc shim built from
// the containerd Go module, so the integration tests run the containerd 1.7
// daemon (integration/cmd/containerd17) with its own shim rather than
// Debian's 1.6 one.
package main

import (
	"context"

	"github.com/containerd/containerd/runtime/v2/runc/manager"
	_ "github.com/containerd/containerd/runtime/v2/runc/pause"
	_ "github.com/containerd/containerd/runtime/v2/runc/task/plugin"
	"github.com/containerd/containerd/runtime/v2/shim"
)

func main() {
	shim.RunManager(context.Background(), manager.NewShimManager("io.containerd.runc.v2"))
}
