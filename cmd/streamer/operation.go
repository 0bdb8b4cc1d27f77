package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/service"
)

// envServer names the conversion service when --server is not given.
const envServer = "STREAMER_SERVER"

// serverFlags are the flags of commands that talk to `streamer serve`.
type serverFlags struct {
	url, token string
	timeout    time.Duration
}

func (s *serverFlags) add(fl *pflag.FlagSet) {
	fl.StringVar(&s.url, "server", "", "conversion service `URL` (default $"+envServer+")")
	fl.StringVar(&s.token, "token", "", "API `TOKEN` of the service (default $"+service.EnvToken+")")
	fl.DurationVar(&s.timeout, "timeout", 10*time.Minute, "give up waiting for the service after `DURATION`")
}

// configured reports whether a server is named by flag or environment.
func (s *serverFlags) configured() bool { return s.serverURL() != "" }

func (s *serverFlags) serverURL() string {
	if s.url != "" {
		return s.url
	}
	return os.Getenv(envServer)
}

// client returns the API client; a usage error without a server.
func (s *serverFlags) client() (*service.Client, error) {
	u := s.serverURL()
	if u == "" {
		return nil, usageError{fmt.Errorf("no conversion service: give --server URL or set $%s", envServer)}
	}
	if !strings.Contains(u, "://") {
		u = "http://" + u
	}
	tok := s.token
	if tok == "" {
		tok = os.Getenv(service.EnvToken)
	}
	return &service.Client{URL: u, Token: tok}, nil
}

// kindError keeps err's message and adds a kind for exitCode.
type kindError struct{ err, kind error }

func (k kindError) Error() string   { return k.err.Error() }
func (k kindError) Unwrap() []error { return []error{k.err, k.kind} }

// serverError maps the service's error kinds to the CLI's exit codes.
func serverError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, service.ErrInvalid):
		return usageError{err}
	case errors.Is(err, service.ErrNotFound):
		return kindError{err, fetcher.ErrNotFound}
	case errors.Is(err, service.ErrUnauthorized):
		return kindError{err, fetcher.ErrUnauthorized}
	case errors.Is(err, service.ErrServerUnreachable), errors.Is(err, service.ErrUnavailable):
		return kindError{err, fetcher.ErrUnreachable}
	}
	return err
}

func newOperationCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "operation",
		Short: "Show or cancel conversion operations of the service (streamer serve)",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			return usageError{errors.New("operation needs a subcommand: show or cancel")}
		},
	}
	cmd.AddCommand(newOperationShowCmd(), newOperationCancelCmd())
	return cmd
}

func newOperationShowCmd() *cobra.Command {
	var (
		s                 serverFlags
		id, image, output string
	)
	cmd := &cobra.Command{
		Use:   "show --id ID | --image IMAGE",
		Short: "Show an operation: state, progress, timestamps, error, artifact digest",
		Long: `show prints an operation's state (queued, running, succeeded, failed,
canceled), progress, timestamps, the error when it failed and the artifact
digest when it succeeded. With --image, the image's newest operation.`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if (id == "") == (image == "") {
				return usageError{errors.New("give exactly one of --id and --image")}
			}
			c, err := s.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), s.timeout)
			defer cancel()
			var op *service.Operation
			if id != "" {
				op, err = c.Operation(ctx, id)
			} else {
				var ops []*service.Operation
				if ops, err = c.ForImage(ctx, image); err == nil {
					if len(ops) == 0 {
						return kindError{fmt.Errorf("no operation for image %s", image), fetcher.ErrNotFound}
					}
					op = ops[0]
				}
			}
			if err != nil {
				return serverError(err)
			}
			if output == "json" {
				writeJSON(cmd.OutOrStdout(), op)
				return nil
			}
			return printOperation(cmd.OutOrStdout(), op)
		},
	}
	fl := cmd.Flags()
	s.add(fl)
	fl.StringVar(&id, "id", "", "operation `ID`")
	fl.StringVar(&image, "image", "", "show the newest operation of `IMAGE`")
	fl.StringVarP(&output, "output", "o", "text", "output `FORMAT`: text or json")
	return cmd
}

func newOperationCancelCmd() *cobra.Command {
	var (
		s      serverFlags
		id     string
		noWait bool
	)
	cmd := &cobra.Command{
		Use:   "cancel --id ID",
		Short: "Cancel a queued or running operation; nothing half-made stays referenced",
		Long: `cancel stops a queued or running conversion. The artifact manifest is pushed
only after all its blobs, so a cancelled conversion leaves no artifact
referenced by the image. Without --no-wait it waits for the final state.`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if id == "" {
				return usageError{errors.New("--id is required")}
			}
			c, err := s.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), s.timeout)
			defer cancel()
			op, err := c.Cancel(ctx, id)
			if err != nil {
				if errors.Is(err, service.ErrConflict) {
					return fmt.Errorf("cancel operation %s: %w", id, err)
				}
				return serverError(err)
			}
			if !noWait {
				if op, err = c.Wait(ctx, id, 200*time.Millisecond, nil); err != nil {
					return serverError(err)
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\n", op.ID, op.State)
			return nil
		},
	}
	fl := cmd.Flags()
	s.add(fl)
	fl.StringVar(&id, "id", "", "operation `ID`")
	fl.BoolVar(&noWait, "no-wait", false, "return once the cancel is requested")
	return cmd
}

func fmtTime(t *time.Time) string {
	if t == nil || t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

// printOperation writes an operation as aligned "Key: value" lines and one
// line per layer.
func printOperation(w io.Writer, op *service.Operation) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	done, total := op.BytesDone()
	layersDone := 0
	for _, l := range op.Layers {
		if l.Done {
			layersDone++
		}
	}
	created := op.Created
	rows := [][2]string{
		{"ID", op.ID}, {"Image", op.Image}, {"Digest", op.Digest.String()}, {"State", string(op.State)},
		{"Source", op.Source}, {"Attempts", fmt.Sprint(op.Attempts)},
		{"Created", fmtTime(&created)}, {"Started", fmtTime(op.Started)}, {"Finished", fmtTime(op.Finished)},
		{"Progress", fmt.Sprintf("%s / %s, %d/%d layers", humanBytes(done), humanBytes(total), layersDone, len(op.Layers))},
	}
	if op.Artifact != "" {
		rows = append(rows, [2]string{"Artifact", op.Artifact.String()})
	}
	if op.Error != "" {
		rows = append(rows, [2]string{"Error", op.Error})
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s:\t%s\n", r[0], r[1])
	}
	for _, r := range op.Results {
		state := "created"
		if r.Existing {
			state = "existing"
		}
		fmt.Fprintf(tw, "Result:\t%s %s %s\n", orDash(r.Platform), r.Artifact, state)
	}
	for _, l := range op.Layers {
		state := "converting"
		switch {
		case l.Reused:
			state = "reused"
		case l.Done:
			state = "done"
		}
		p := ""
		if l.Platform != "" {
			p = l.Platform + " "
		}
		fmt.Fprintf(tw, "Layer:\t%slayer %d/%d %s %s / %s %s\n", p, l.Index+1, l.Count, shortDigest(l.Layer.String()), humanBytes(l.Bytes), humanBytes(l.Size), state)
	}
	return tw.Flush()
}
