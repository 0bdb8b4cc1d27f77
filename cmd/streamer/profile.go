package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/converter"
)

// startupProfile is the body of streamer-snapshotter's GET /profile?image=REF.
type startupProfile struct {
	Image  string                      `json:"image"`
	Files  []string                    `json:"files"`
	Ranges map[string][]artifact.Range `json:"ranges,omitempty"`
}

// list is the profile as a prefetch list.
func (p *startupProfile) list() []converter.PrefetchFile {
	out := make([]converter.PrefetchFile, 0, len(p.Files))
	for _, f := range p.Files {
		out = append(out, converter.PrefetchFile{Path: f, Ranges: p.Ranges[f]})
	}
	return out
}

// errNoProfile: the snapshotter has recorded nothing for the image.
var errNoProfile = errors.New("no startup profile recorded")

// errNotAtDaemon: the snapshotter answered 404 for what was asked.
var errNotAtDaemon = errors.New("not found at the snapshotter")

func newProfileCmd() *cobra.Command {
	var address, image, output string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "profile --address SOCKET_OR_URL --image IMAGE",
		Short: "Print the files IMAGE read first on a node (its startup profile), ready for create --prefetch-list",
		Long: `profile asks a streamer-snapshotter (GET /profile on its metrics_address) for
the files the containers of IMAGE read first on that node, during the first
fetch.record_window after each of its layers mounted, in first-read order. It
prints one absolute path per line, followed, for a file of which the startup
read only parts, by a tab and those byte ranges (OFFSET+SIZE, comma-separated,
whole chunks): the format create --prefetch-list reads, which prefetches only
those parts of the file first and leaves the rest to the background fetch:

  streamer profile --address /run/streamer-snapshotter/metrics.sock --image IMAGE > list.txt
  streamer create --prefetch-list list.txt IMAGE`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if address == "" || image == "" {
				return usageError{errors.New("--address and --image are required")}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			p, err := fetchProfile(ctx, address, image)
			if err != nil {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(p)
			}
			for _, f := range p.list() {
				fmt.Fprintln(cmd.OutOrStdout(), f)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&address, "address", "", "the daemon's metrics_address: unix socket `PATH`, host:port or http:// URL")
	f.StringVar(&image, "image", "", "the `IMAGE` reference, as the node pulled it")
	f.StringVarP(&output, "output", "o", "text", "output `FORMAT`: text (one path per line) or json")
	f.DurationVar(&timeout, "timeout", 10*time.Second, "time limit of the request")
	return cmd
}

// nodeRequest sends method pathQuery to the daemon at address (a unix
// socket path, host:port or http(s):// URL) and returns the body of a 2xx
// answer. A 404 wraps errNotAtDaemon.
func nodeRequest(ctx context.Context, method, address, pathQuery string) ([]byte, error) {
	client := &http.Client{}
	base := strings.TrimSuffix(address, "/")
	switch {
	case filepath.IsAbs(address):
		sock := address
		client.Transport = &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}
		base = "http://streamer-snapshotter"
	case strings.HasPrefix(address, "http://") || strings.HasPrefix(address, "https://"):
	default:
		base = "http://" + base
	}
	req, err := http.NewRequestWithContext(ctx, method, base+pathQuery, nil)
	if err != nil {
		return nil, usageError{fmt.Errorf("--address %q: %w", address, err)}
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("ask the snapshotter at %s: %w", address, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("read the answer of the snapshotter at %s: %w", address, err)
	}
	switch {
	case resp.StatusCode/100 == 2:
		return b, nil
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("%w: %s", errNotAtDaemon, strings.TrimSpace(string(b)))
	}
	return nil, fmt.Errorf("%s %s from %s: %s: %s", method, pathQuery, address, resp.Status, strings.TrimSpace(string(b)))
}

// fetchProfile gets the startup profile of image from the daemon at address.
func fetchProfile(ctx context.Context, address, image string) (*startupProfile, error) {
	b, err := nodeRequest(ctx, http.MethodGet, address, "/profile?image="+url.QueryEscape(image))
	if errors.Is(err, errNotAtDaemon) {
		err = fmt.Errorf("%w: %w", errNoProfile, err)
	}
	if err != nil {
		return nil, fmt.Errorf("startup profile of %s: %w", image, err)
	}
	var p startupProfile
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("decode startup profile of %s: %w", image, err)
	}
	return &p, nil
}

// readPrefetchList reads a --prefetch-list file; "" means none (nil).
func readPrefetchList(path string) ([]converter.PrefetchFile, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, usageError{fmt.Errorf("--prefetch-list: %w", err)}
	}
	defer f.Close()
	list, err := converter.ParsePrefetchList(f)
	if err != nil {
		return nil, usageError{fmt.Errorf("--prefetch-list %s: %w", path, err)}
	}
	return list, nil
}

// writePrefetchList writes list as a --prefetch-list file.
func writePrefetchList(path string, image string, list []converter.PrefetchFile) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# startup profile of %s, recorded %s\n", image, time.Now().UTC().Format(time.RFC3339))
	for _, f := range list {
		b.WriteString(f.String() + "\n")
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write prefetch list: %w", err)
	}
	return nil
}
