package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/streamer-dev/streamer/snapshotter"
)

// serveMetrics serves /metrics (the default Prometheus registry), /healthz
// (the process answers) and /readyz (200 once ready reports true: the
// snapshots API is serving; 503 before and while shutting down) on addr, a
// unix socket path or host:port. /status and /profile, which name the
// node's images and the files their containers read, are served on a unix
// socket only (mode 0660, root and the containerd group): a TCP port is
// open to every user of the node. stop shuts it down.
func serveMetrics(addr string, ready func() bool) (stop func(), err error) {
	var l net.Listener
	local := filepath.IsAbs(addr)
	if local {
		l, err = snapshotter.Listen(addr)
	} else {
		l, err = net.Listen("tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("listen for metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.Handler())
	if local {
		mux.Handle("/status", statusHandler)
		mux.Handle("/profile", profileHandler)
	} else {
		refuse := func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, r.URL.Path+" is served only when metrics_address is a unix socket path (it names the node's images and the files they read; a TCP port is open to every local user)", http.StatusForbidden)
		}
		mux.HandleFunc("/status", refuse)
		mux.HandleFunc("/profile", refuse)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if !ready() {
			http.Error(w, "not ready: the snapshots API is not serving", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	// IdleTimeout: a client that drops its keep-alive connections without
	// closing them must not hold the daemon's descriptors and goroutines.
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
			log.L.WithError(err).Error("metrics server stopped")
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	}, nil
}
