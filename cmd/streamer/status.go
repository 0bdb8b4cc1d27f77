package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/fs"
)

// nodeStatus is the body of streamer-snapshotter's GET /status.
type nodeStatus struct {
	Layers []fs.LayerStatus   `json:"layers"`
	Images []fs.ImageDecision `json:"images"`
}

func newStatusCmd() *cobra.Command {
	var address, output, image string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "status --address SOCKET_OR_URL",
		Short: "Show the layers a node's streamer-snapshotter has mounted and how far their fetch is",
		Long: `status asks a streamer-snapshotter for its mounted layers (GET /status on its
metrics_address): per layer the image, digest, sizes, the share of its chunks
already cached, whether it is complete (all cached and checked against its
diffID, so it no longer needs the registry) and its current fetch rate.

--address is the daemon's metrics_address: a unix socket path, host:port,
or an http:// URL.`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if address == "" {
				return usageError{fmt.Errorf("--address is required")}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			st, err := fetchNodeStatus(ctx, address)
			if err != nil {
				return err
			}
			if image != "" {
				return printImageDecision(cmd.OutOrStdout(), st, image, output)
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			return printNodeStatus(cmd.OutOrStdout(), st)
		},
	}
	f := cmd.Flags()
	f.StringVar(&address, "address", "", "the daemon's metrics_address: unix socket `PATH`, host:port or http:// URL")
	f.StringVarP(&output, "output", "o", "text", "output `FORMAT`: text or json")
	f.DurationVar(&timeout, "timeout", 10*time.Second, "time limit of the request")
	f.StringVar(&image, "image", "", "show only why `IMAGE` (as the node pulled it) was streamed or not")
	return cmd
}

// fetchNodeStatus gets /status from the daemon at address.
func fetchNodeStatus(ctx context.Context, address string) (*nodeStatus, error) {
	b, err := nodeRequest(ctx, http.MethodGet, address, "/status")
	if err != nil {
		return nil, fmt.Errorf("get status: %w", err)
	}
	var st nodeStatus
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decode status from %s: %w", address, err)
	}
	return &st, nil
}

// printImageDecision prints whether the node streamed image, and why not.
func printImageDecision(w io.Writer, st *nodeStatus, image, output string) error {
	for _, d := range st.Images {
		if d.Image != image {
			continue
		}
		if output == "json" {
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			return enc.Encode(d)
		}
		fmt.Fprintf(w, "Image:    %s\nManifest: %s\nStreamed: %d layers\nPulled:   %d layers\nReason:   %s\n",
			d.Image, d.Manifest, d.StreamedLayers, d.PulledLayers, d.Reason)
		return nil
	}
	return fmt.Errorf("image %s: %w: the node has not pulled it through streamer-snapshotter since the daemon started", image, fetcher.ErrNotFound)
}

func printNodeStatus(w io.Writer, st *nodeStatus) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tLAYER\tCOMPRESSED\tUNCOMPRESSED\tFETCHED\tCOMPLETE\tRATE")
	for _, l := range st.Layers {
		complete := "no"
		switch {
		case l.Bad:
			complete = "BAD"
		case l.Complete:
			complete = "yes"
		}
		layer := l.Layer.String()
		if len(layer) > 19 {
			layer = layer[:19]
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.1f%%\t%s\t%s/s\n", l.Image, layer,
			statusBytes(float64(l.CompressedSize)), statusBytes(float64(l.UncompressedSize)),
			l.FetchedPercent, complete, statusBytes(l.FetchRate))
	}
	if len(st.Layers) == 0 {
		fmt.Fprintln(tw, "(no layer mounted)")
	}
	return tw.Flush()
}

func statusBytes(n float64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	i := 0
	for n >= 1024 && i < len(units)-1 {
		n /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%.0f %s", n, units[i])
	}
	return fmt.Sprintf("%.1f %s", n, units[i])
}
