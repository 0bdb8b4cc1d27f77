package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/streamer-dev/streamer/converter"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/service"
)

// envWebhookSecret holds the webhook secret when --webhook-secret is not
// given.
const envWebhookSecret = "STREAMER_WEBHOOK_SECRET"

type serveFlags struct {
	listen, state, token, secret, registryHost, chunkSize string
	workers                                               int
}

func newServeCmd(g *globalFlags) *cobra.Command {
	f := &serveFlags{}
	cmd := &cobra.Command{
		Use:   "serve --state DIR",
		Short: "Run the conversion service: operations, cancel, auto-conversion per repository",
		Long: `serve runs the conversion service (HTTP API in docs/api.md). Conversions are
operations with ids, run by a pool of --workers, shown and cancelled with
"streamer operation". Their state lives in DIR/state.db (bbolt) and survives
restarts: an operation interrupted by a crash is run again (conversion is
idempotent).

Repositories with streaming enabled ("streamer update --enable-streaming")
have every manifest pushed by tag converted automatically: point the
registry's notifications at /v1/webhooks/registry with the header
"Authorization: Bearer SECRET".

The API token is --token or $STREAMER_SERVER_TOKEN; the webhook secret
--webhook-secret or $STREAMER_WEBHOOK_SECRET. Both are required.`,
		Example: "  streamer serve --listen 127.0.0.1:8080 --state /var/lib/streamer --workers 4",
		Args:    exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !cmd.Flag("log-level").Changed {
				_ = setLogLevel("info")
			}
			return runServe(cmd, g, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.listen, "listen", "127.0.0.1:8080", "`ADDRESS` (host:port) the HTTP API listens on")
	fl.StringVar(&f.state, "state", "", "state `DIR` (database, layer index); required")
	fl.IntVar(&f.workers, "workers", 2, "`N` conversions at once")
	fl.StringVar(&f.token, "token", "", "API `TOKEN` (default $"+service.EnvToken+")")
	fl.StringVar(&f.secret, "webhook-secret", "", "registry notification `SECRET` (default $"+envWebhookSecret+")")
	fl.StringVar(&f.registryHost, "registry-host", "", "registry `HOST` used for every notification instead of the event's request.host")
	fl.StringVar(&f.chunkSize, "chunk-size", "", "maximum uncompressed chunk `SIZE` (default 1MiB)")
	return cmd
}

func runServe(cmd *cobra.Command, g *globalFlags, f *serveFlags) error {
	if f.state == "" {
		return usageError{errors.New("--state is required")}
	}
	if f.workers < 1 {
		return usageError{fmt.Errorf("--workers %d: want at least 1", f.workers)}
	}
	if f.token == "" {
		f.token = os.Getenv(service.EnvToken)
	}
	if f.secret == "" {
		f.secret = os.Getenv(envWebhookSecret)
	}
	if f.token == "" || f.secret == "" {
		return usageError{fmt.Errorf("an API token (--token or $%s) and a webhook secret (--webhook-secret or $%s) are required", service.EnvToken, envWebhookSecret)}
	}
	chunk, err := parseChunkSize(f.chunkSize)
	if err != nil {
		return err
	}
	c, err := g.client(fetcher.Ref{})
	if err != nil {
		return err
	}
	svc, err := service.New(service.Config{
		StateDir: f.state, Workers: f.workers, Token: f.token, WebhookSecret: f.secret,
		Registry: c, RegistryHost: f.registryHost, Layer: converter.LayerOptions{ChunkSize: chunk},
		Deleter: &service.RegistryDeleter{Insecure: g.insecure, Username: os.Getenv(fetcher.EnvUsername), Password: os.Getenv(fetcher.EnvPassword)},
	})
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	if err := svc.Start(ctx); err != nil {
		svc.Close()
		return err
	}
	defer svc.Close()
	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		return usageError{fmt.Errorf("--listen %s: %w", f.listen, err)}
	}
	srv := &http.Server{Handler: svc.Handler(), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	log.G(ctx).WithFields(log.Fields{"listen": ln.Addr().String(), "state": f.state, "workers": f.workers}).Info("streamer serve listening")
	fmt.Fprintf(cmd.OutOrStdout(), "listening on http://%s\n", ln.Addr())
	select {
	case err := <-errc:
		return fmt.Errorf("serve HTTP: %w", err)
	case <-ctx.Done():
	}
	shut, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(shut); err != nil {
		return fmt.Errorf("shut down HTTP server: %w", err)
	}
	return nil
}
