// Command containerd17 is containerd 1.7 built from the containerd Go module
// this project depends on (github.com/containerd/containerd v1.7), with the
// builtin plugins and the CRI plugin, for the integration tests' second
// containerd of the compatibility matrix (Debian ships 1.6). Its runc shim
// is integration/cmd/containerd-shim-runc-v2.
//
// The integration harness builds it (harness.BuildContainerd17) with the
// tags that leave out the snapshotters needing cgo headers or modules the
// project does not carry, and tracing:
//
//	go build -tags "no_aufs no_btrfs no_devmapper no_zfs no_tracing" ./integration/cmd/containerd17
package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"strings"

	"github.com/containerd/containerd/cmd/containerd/command"
	"github.com/containerd/containerd/version"

	// Every builtin plugin of containerd's own main, CRI included
	// (builtins/cri.go), minus what the build tags leave out.
	_ "github.com/containerd/containerd/cmd/containerd/builtins"
)

// init reports the containerd module's version (containerd's release
// builds set it with -ldflags; here go.mod is the source of truth).
func init() {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return
	}
	for _, d := range bi.Deps {
		if d.Path == version.Package {
			if d.Replace != nil {
				d = d.Replace
			}
			version.Version = strings.TrimPrefix(d.Version, "v")
		}
	}
}

func main() {
	if err := command.App().Run(os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "containerd: %s\n", err)
		os.Exit(1)
	}
}
