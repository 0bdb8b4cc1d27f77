package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/config"
	"github.com/streamer-dev/streamer/converter"
	"github.com/streamer-dev/streamer/service"
)

type createFlags struct {
	platform  string
	chunkSize string
	output    string
	image     string
	noWait    bool
	server    serverFlags
	// prefetchList is the --prefetch-list file; prefetchIgnoreMissing
	// tolerates paths the image lacks.
	prefetchList          string
	prefetchIgnoreMissing bool
}

func newCreateCmd(g *globalFlags) *cobra.Command {
	f := &createFlags{}
	cmd := &cobra.Command{
		Use:   "create IMAGE",
		Short: "Convert IMAGE and push its streaming artifact (every platform, or --platform)",
		Long: `create converts every platform of IMAGE (or only --platform) into a streaming
artifact and pushes it into IMAGE's repository as a referrer of the platform's
image manifest. It prints the artifact digest of each platform. An image that
already has a streaming artifact is left alone (create is idempotent), and
layers converted before on this machine are reused when the registry still
has them.

With a conversion service (--server URL or $STREAMER_SERVER), create starts an
operation there and prints its id; without --no-wait it follows the
operation's progress until it ends.`,
		Example: "  streamer create registry.example.com/team/app:1.0\n  streamer create --server http://127.0.0.1:8080 --image registry.example.com/team/app:1.0 --no-wait\n  streamer create --platform linux/arm64 --chunk-size 2MiB --insecure 10.0.0.5:5000 10.0.0.5:5000/app:1.0",
		Args: func(cmd *cobra.Command, args []string) error {
			if f.image != "" {
				if len(args) > 0 {
					return usageError{errors.New("give IMAGE or --image, not both")}
				}
				return nil
			}
			return exactArgs(1)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			image := f.image
			if image == "" {
				image = args[0]
			}
			if f.server.configured() {
				return runCreateRemote(cmd, f, image)
			}
			if f.noWait {
				return usageError{errors.New("--no-wait needs a conversion service (--server)")}
			}
			return runCreate(cmd, g, f, image)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.platform, "platform", "", "convert only this `PLATFORM` (os/arch[/variant]) of a multi-platform image")
	fl.StringVar(&f.chunkSize, "chunk-size", "", "maximum uncompressed chunk `SIZE`, e.g. 1MiB (64KiB..64MiB; default 1MiB)")
	fl.StringVarP(&f.output, "output", "o", "text", "output `FORMAT`: text or json (JSON lines)")
	fl.StringVar(&f.image, "image", "", "the `IMAGE` to convert (instead of the argument)")
	fl.BoolVar(&f.noWait, "no-wait", false, "with a service: print the operation id and return without following it")
	f.server.add(fl)
	fl.StringVar(&f.prefetchList, "prefetch-list", "", "startup profile `FILE`: one path per line (# comments), files read at startup in order, each optionally followed by a tab and the byte ranges read (OFFSET+SIZE,...); an existing artifact with other lists gets a new revision")
	fl.BoolVar(&f.prefetchIgnoreMissing, "prefetch-ignore-missing", false, "ignore --prefetch-list paths the image does not have instead of failing")
	return cmd
}

// parseChunkSize parses --chunk-size; "" is the default.
func parseChunkSize(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := config.ParseSize(s)
	if err != nil {
		return 0, usageError{fmt.Errorf("--chunk-size: %w", err)}
	}
	if int64(n) < artifact.MinChunkSize || int64(n) > artifact.MaxChunkSize {
		return 0, usageError{fmt.Errorf("--chunk-size %s: want %s to %s", s, config.Size(artifact.MinChunkSize), config.Size(artifact.MaxChunkSize))}
	}
	return int64(n), nil
}

func runCreate(cmd *cobra.Command, g *globalFlags, f *createFlags, image string) error {
	if err := checkOutput(f.output); err != nil {
		return err
	}
	chunk, err := parseChunkSize(f.chunkSize)
	if err != nil {
		return err
	}
	ref, err := parseRef(image)
	if err != nil {
		return err
	}
	c, err := g.client(ref)
	if err != nil {
		return err
	}
	stderr := cmd.ErrOrStderr()
	var p progressPrinter
	switch {
	case f.output == "json":
		p = &jsonProgress{w: cmd.OutOrStdout()}
	case isTerminal(stderr):
		p = &ttyProgress{w: stderr}
	default:
		p = &lineProgress{w: stderr}
	}
	opts := converter.Options{Platform: f.platform, Layer: converter.LayerOptions{ChunkSize: chunk}, Progress: p.progress()}
	if opts.PrefetchList, err = readPrefetchList(f.prefetchList); err != nil {
		return err
	}
	opts.PrefetchIgnoreMissing = f.prefetchIgnoreMissing
	results, err := converter.Convert(cmd.Context(), c, ref, opts)
	p.finish()
	// Results of platforms done before an error are still worth printing.
	for _, r := range results {
		if f.output == "json" {
			writeJSON(cmd.OutOrStdout(), resultJSON(r))
			continue
		}
		state := "created"
		if r.Existing {
			state = "existing"
		}
		platform := r.Platform
		if platform == "" {
			platform = "unknown"
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\t%s\n", platform, r.Artifact.Digest, state)
	}
	return err
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// progressPrinter renders conversion progress.
type progressPrinter interface {
	progress() converter.Progress
	finish()
}

func layerName(ev converter.LayerEvent) string {
	s := fmt.Sprintf("layer %d/%d %s", ev.Index+1, ev.Count, shortDigest(ev.Layer.String()))
	if ev.Platform != "" {
		s = ev.Platform + " " + s
	}
	return s
}

// lineProgress prints one plain line per layer event (not a terminal).
type lineProgress struct{ w io.Writer }

func (l *lineProgress) progress() converter.Progress {
	return converter.Progress{
		Start: func(ev converter.LayerEvent) {
			fmt.Fprintf(l.w, "%s: converting (%s)\n", layerName(ev), humanBytes(ev.Size))
		},
		Done: func(ev converter.LayerEvent, r converter.LayerReport) {
			fmt.Fprintf(l.w, "%s: done, %s in %d chunks\n", layerName(ev), humanBytes(r.Blob.Size), r.Chunks)
		},
		Reused: func(ev converter.LayerEvent, r converter.LayerReport) {
			fmt.Fprintf(l.w, "%s: reused %s\n", layerName(ev), shortDigest(r.Blob.Digest.String()))
		},
	}
}

func (l *lineProgress) finish() {}

// ttyProgress updates one line per layer in place on a terminal.
type ttyProgress struct {
	w    io.Writer
	mu   sync.Mutex
	last time.Time
	open bool // a line is being updated
}

func (t *ttyProgress) line(s string, final bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	fmt.Fprintf(t.w, "\r\x1b[K%s", s)
	t.open = !final
	if final {
		fmt.Fprintln(t.w)
	}
}

func (t *ttyProgress) progress() converter.Progress {
	return converter.Progress{
		Start: func(ev converter.LayerEvent) { t.line(layerName(ev)+": starting", false) },
		Bytes: func(ev converter.LayerEvent) {
			if time.Since(t.last) < 100*time.Millisecond {
				return
			}
			t.last = time.Now()
			t.line(fmt.Sprintf("%s: %s / %s", layerName(ev), humanBytes(ev.Bytes), humanBytes(ev.Size)), false)
		},
		Done: func(ev converter.LayerEvent, r converter.LayerReport) {
			t.line(fmt.Sprintf("%s: done, %s in %d chunks", layerName(ev), humanBytes(r.Blob.Size), r.Chunks), true)
		},
		Reused: func(ev converter.LayerEvent, r converter.LayerReport) {
			t.line(fmt.Sprintf("%s: reused", layerName(ev)), true)
		},
	}
}

func (t *ttyProgress) finish() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.open {
		fmt.Fprintln(t.w)
	}
}

// jsonProgress writes one JSON object per event to stdout.
type jsonProgress struct {
	w    io.Writer
	last time.Time
}

type eventJSON struct {
	Event    string `json:"event"`
	Platform string `json:"platform,omitempty"`
	Index    int    `json:"index"`
	Count    int    `json:"count"`
	Layer    string `json:"layer"`
	Size     int64  `json:"size"`
	Bytes    int64  `json:"bytes"`
	Blob     string `json:"blob,omitempty"`
	TOC      string `json:"toc,omitempty"`
}

func (j *jsonProgress) event(name string, ev converter.LayerEvent, r *converter.LayerReport) {
	e := eventJSON{Event: name, Platform: ev.Platform, Index: ev.Index, Count: ev.Count, Layer: ev.Layer.String(), Size: ev.Size, Bytes: ev.Bytes}
	if r != nil {
		e.Blob, e.TOC = r.Blob.Digest.String(), r.TOC.Digest.String()
	}
	writeJSON(j.w, e)
}

func (j *jsonProgress) progress() converter.Progress {
	return converter.Progress{
		Start: func(ev converter.LayerEvent) { j.event("layer-start", ev, nil) },
		Bytes: func(ev converter.LayerEvent) {
			if time.Since(j.last) < time.Second {
				return
			}
			j.last = time.Now()
			j.event("layer-bytes", ev, nil)
		},
		Done:   func(ev converter.LayerEvent, r converter.LayerReport) { j.event("layer-done", ev, &r) },
		Reused: func(ev converter.LayerEvent, r converter.LayerReport) { j.event("layer-reused", ev, &r) },
	}
}

func (j *jsonProgress) finish() {}

type resultLayerJSON struct {
	Original string `json:"original"`
	DiffID   string `json:"diffID"`
	Blob     string `json:"blob"`
	BlobSize int64  `json:"blobSize"`
	TOC      string `json:"toc"`
	Reused   bool   `json:"reused"`
}

type resultJSONT struct {
	Event    string            `json:"event"`
	Platform string            `json:"platform"`
	Subject  string            `json:"subject"`
	Artifact string            `json:"artifact"`
	Existing bool              `json:"existing"`
	Layers   []resultLayerJSON `json:"layers"`
}

func resultJSON(r converter.Result) resultJSONT {
	out := resultJSONT{Event: "result", Platform: r.Platform, Subject: r.Subject.Digest.String(), Artifact: r.Artifact.Digest.String(), Existing: r.Existing, Layers: []resultLayerJSON{}}
	for _, l := range r.Layers {
		out.Layers = append(out.Layers, resultLayerJSON{Original: l.Original.String(), DiffID: l.DiffID.String(), Blob: l.Blob.Digest.String(), BlobSize: l.Blob.Size, TOC: l.TOC.Digest.String(), Reused: l.Reused})
	}
	return out
}

func writeJSON(w io.Writer, v any) {
	b, _ := json.Marshal(v)
	fmt.Fprintf(w, "%s\n", b)
}

// shortDigest is "sha256:" and 12 hex digits, as docker prints.
func shortDigest(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

// humanBytes formats n with a binary unit.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// runCreateRemote starts an operation on the conversion service, prints its
// id and, unless --no-wait, follows it to its end.
func runCreateRemote(cmd *cobra.Command, f *createFlags, image string) error {
	if err := checkOutput(f.output); err != nil {
		return err
	}
	if f.prefetchList != "" {
		return usageError{errors.New("--prefetch-list applies to local conversions, not to a conversion service")}
	}
	if f.platform != "" || f.chunkSize != "" {
		return usageError{errors.New("--platform and --chunk-size apply to local conversions; the service converts every platform with its own settings")}
	}
	if _, err := parseRef(image); err != nil {
		return err
	}
	c, err := f.server.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), f.server.timeout)
	defer cancel()
	op, _, err := c.Create(ctx, image)
	if err != nil {
		return serverError(err)
	}
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	if f.output == "json" {
		writeJSON(stdout, op)
	} else {
		fmt.Fprintln(stdout, op.ID)
	}
	if f.noWait {
		return nil
	}
	seen := map[string]string{}
	op, err = c.Wait(ctx, op.ID, 250*time.Millisecond, func(o *service.Operation) {
		for _, l := range o.Layers {
			state := "converting"
			switch {
			case l.Reused:
				state = "reused"
			case l.Done:
				state = "done"
			}
			key := l.Platform + l.Layer.String()
			if seen[key] != state {
				seen[key] = state
				fmt.Fprintf(stderr, "%s: %s (%s)\n", layerName(converter.LayerEvent{Platform: l.Platform, Index: l.Index, Count: l.Count, Layer: l.Layer}), state, humanBytes(l.Size))
			}
		}
	})
	if err != nil {
		return serverError(err)
	}
	if f.output == "json" {
		writeJSON(stdout, op)
	} else {
		for _, r := range op.Results {
			state := "created"
			if r.Existing {
				state = "existing"
			}
			fmt.Fprintf(stdout, "%s\t%s\t%s\n", orDash(r.Platform), r.Artifact, state)
		}
	}
	switch op.State {
	case service.Failed:
		return fmt.Errorf("operation %s failed: %s", op.ID, op.Error)
	case service.Canceled:
		return fmt.Errorf("operation %s was canceled", op.ID)
	}
	return nil
}
