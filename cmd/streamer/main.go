// Command streamer converts container images into streaming artifacts and
// inspects them: `streamer create IMAGE` pushes, for every platform of the
// image, an OCI referrer holding per-layer streaming blobs and tables of
// contents that streamer-snapshotter mounts lazily on nodes.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "streamer: "+oneLine(err))
		os.Exit(exitCode(err))
	}
}

// run executes the command line with a context that SIGINT and SIGTERM
// cancel; an error after such a signal is marked interrupted.
func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := newRootCmd(os.Stdout, os.Stderr).ExecuteContext(ctx)
	if err != nil && ctx.Err() != nil {
		return interrupted{err}
	}
	return err
}

// oneLine keeps an error on one line: every error names the thing, once.
func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}
