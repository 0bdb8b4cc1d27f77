// Command streamer-snapshotter is Streamer's node daemon: a containerd
// remote snapshotter, served as a proxy plugin on a unix socket, that mounts
// image layers with a streaming artifact instead of downloading them.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"github.com/streamer-dev/streamer/config"
	"github.com/streamer-dev/streamer/fs"
	"github.com/streamer-dev/streamer/snapshotter"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const defaultConfigPath = "/etc/streamer-snapshotter/config.toml"

func main() {
	// Subcommands (install, uninstall, check) come before the daemon's flags.
	if len(os.Args) > 1 {
		if sub, ok := subcommands[os.Args[1]]; ok {
			os.Exit(sub(os.Args[2:], os.Stdout, os.Stderr))
		}
	}
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "streamer-snapshotter: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	configPath := flag.String("config", defaultConfigPath, "path of the TOML config file (optional when left at its default)")
	root := flag.String("root", "", "overrides the config's root: directory of snapshots and cache")
	address := flag.String("address", "", "overrides the config's address: unix socket of the snapshots API")
	logLevel := flag.String("log-level", "", "overrides the config's log_level")
	printDefault := flag.Bool("print-default-config", false, "print the default config, documented, and exit")
	showVersion := flag.Bool("version", false, "print the version and exit")
	fdHolder := flag.Bool("fd-holder", true, "keep FUSE mounts alive across restarts of the daemon with a descriptor holder process (docs/restart.md)")
	flag.Parse()
	if *showVersion {
		fmt.Println("streamer-snapshotter", version)
		return nil
	}
	if *printDefault {
		return config.DefaultDaemon().Encode(os.Stdout)
	}

	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	cfg, err := config.LoadDaemon(*configPath)
	if errors.Is(err, os.ErrNotExist) && !set["config"] {
		cfg, err = config.DefaultDaemon(), nil
	}
	if err != nil {
		return err
	}
	override := func(name string, key *string, value string) {
		if set[name] {
			*key = value
		}
	}
	override("root", &cfg.Root, *root)
	override("address", &cfg.Address, *address)
	override("log-level", &cfg.LogLevel, *logLevel)
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid config: %w", err)
	}

	if err := log.SetLevel(cfg.LogLevel); err != nil {
		return fmt.Errorf("log_level: %w", err)
	}
	if cfg.LogFormat == "json" {
		logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: time.RFC3339Nano})
	} else {
		logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: time.RFC3339Nano})
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("FUSE is unavailable (%w): load the fuse module, or give the container --device /dev/fuse", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	logger := log.G(ctx)

	// Take the socket first: a second daemon fails here, before touching root.
	l, err := snapshotter.Listen(cfg.Address)
	if err != nil {
		return err
	}
	defer l.Close() // removes the socket file
	if *fdHolder {
		closeHolder, err := startFDHolder(cfg.Root)
		if err != nil {
			logger.WithError(err).Warn("no descriptor holder: layer mounts will not survive a restart of the daemon")
		} else {
			defer closeHolder()
		}
	}
	fsys, closeFS, err := newFileSystem(ctx, &cfg)
	if err != nil {
		return fmt.Errorf("set up remote filesystem: %w", err)
	}
	defer closeFS()
	sn, err := snapshotter.NewSnapshotter(ctx, cfg.Root, fsys, snapshotter.WithLogger(logger))
	if err != nil {
		return fmt.Errorf("open snapshotter: %w", err)
	}
	defer sn.Close()        // unmounts every remote layer
	var serving atomic.Bool // /readyz
	if cfg.MetricsAddress != "" {
		stopMetrics, err := serveMetrics(cfg.MetricsAddress, serving.Load)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}

	srv := snapshotter.NewServer(sn)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	serving.Store(true) // the socket is bound: connections queue until Serve accepts them
	logger.WithFields(logrus.Fields{"address": cfg.Address, "root": cfg.Root, "version": version}).Info("serving")
	select {
	case err := <-served:
		return fmt.Errorf("serve snapshots API: %w", err)
	case <-ctx.Done():
	}
	serving.Store(false)
	logger.Info("shutting down")
	if *fdHolder {
		fs.HandOver() // held layer mounts stay, for the next daemon
	}
	timer := time.AfterFunc(10*time.Second, srv.Stop) // bound the wait for slow clients
	defer timer.Stop()
	srv.GracefulStop()
	<-served
	return nil
}
