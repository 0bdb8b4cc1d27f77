package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/fs"
	"github.com/streamer-dev/streamer/internal/fdholder"
)

// The descriptor holder keeps the /dev/fuse descriptors of the layer
// mounts while the daemon restarts (docs/restart.md). It is this binary,
// run as `streamer-snapshotter fd-holder`, started by the daemon when none
// is running, in its own session.
func init() { subcommands["fd-holder"] = runFDHolder }

// holderIdleExit is how long a holder holding nothing, with no daemon
// connected, waits before exiting.
const holderIdleExit = 10 * time.Second

func holderSocket(root string) string { return filepath.Join(root, "fdholder.sock") }

// runFDHolder is the fd-holder subcommand.
func runFDHolder(args []string, stdout, stderr io.Writer) int {
	fl := flag.NewFlagSet("fd-holder", flag.ContinueOnError)
	fl.SetOutput(stderr)
	socket := fl.String("socket", "", "unix socket to serve (required)")
	logPath := fl.String("log", "", "log file (default: stderr)")
	idle := fl.Duration("idle-exit", holderIdleExit, "exit after holding nothing, with no daemon connected, this long (0: never)")
	if err := fl.Parse(args); err != nil {
		return 2
	}
	if *socket == "" {
		fmt.Fprintln(stderr, "fd-holder: --socket is required")
		return 2
	}
	lg := logrus.New()
	lg.SetOutput(stderr)
	if *logPath != "" {
		f, err := os.OpenFile(*logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			fmt.Fprintf(stderr, "fd-holder: %v\n", err)
			return 1
		}
		defer f.Close()
		lg.SetOutput(f)
	}
	log := logrus.NewEntry(lg).WithFields(logrus.Fields{"component": "fd-holder", "pid": os.Getpid()})
	l, err := fdholder.Listen(*socket)
	if err != nil {
		log.WithError(err).Error("cannot serve")
		return 1
	}
	// SIGTERM and SIGINT are ignored: the holder must outlive a daemon
	// stopped with its process group. It ends when idle, or by SIGKILL.
	signal.Ignore(syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	log.WithField("socket", *socket).Info("holding descriptors")
	if err := fdholder.Serve(context.Background(), l, fdholder.ServeOptions{IdleExit: *idle, Logger: log}); err != nil {
		log.WithError(err).Error("holder failed")
		return 1
	}
	return 0
}

// startFDHolder connects to the holder of root, starting one if needed,
// and makes it the holder of every layer mount. It returns a function
// that disconnects (the holder keeps running).
func startFDHolder(root string) (func(), error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable for the descriptor holder: %w", err)
	}
	sock := holderSocket(root)
	cl, err := fdholder.Ensure(sock, exe, []string{"fd-holder", "--socket", sock, "--log", filepath.Join(root, "fdholder.log")}, 5*time.Second)
	if err != nil {
		return nil, err
	}
	fs.SetDefaultHolder(cl)
	return func() { fs.SetDefaultHolder(nil); cl.Close() }, nil
}

// Keep tells the snapshotter which layer mounts to leave in place: live
// mounts the descriptor holder keeps, taken over rather than mounted again
// at start, and handed over at a graceful stop.
func (l layers) Keep(mountpoint string) bool { return fs.Resumable(mountpoint) }
