package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/streamer-dev/streamer/service"
)

func newUpdateCmd() *cobra.Command {
	var (
		s         serverFlags
		repo, raw string
		output    string
	)
	cmd := &cobra.Command{
		Use:   "update --repository REPO --enable-streaming true|false",
		Short: "Turn auto-conversion of a repository's new pushes on or off (service)",
		Long: `update turns streaming on or off for REPO ("host/path"). When on, every
manifest pushed by tag into REPO afterwards is converted by the service;
images already there are not (convert them with "streamer create"). Turning
it off stops new conversions and deletes nothing.`,
		Example: "  streamer update --server http://127.0.0.1:8080 --repository registry.example.com/team/app --enable-streaming true",
		Args:    exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if repo == "" || raw == "" {
				return usageError{errors.New("--repository and --enable-streaming are required")}
			}
			on, err := strconv.ParseBool(raw)
			if err != nil {
				return usageError{fmt.Errorf("--enable-streaming %q: want true or false", raw)}
			}
			c, err := s.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), s.timeout)
			defer cancel()
			r, err := c.SetStreaming(ctx, repo, on)
			if err != nil {
				return serverError(err)
			}
			return printRepo(cmd.OutOrStdout(), output, r)
		},
	}
	fl := cmd.Flags()
	s.add(fl)
	fl.StringVar(&repo, "repository", "", "repository `NAME` (host/path)")
	fl.StringVar(&raw, "enable-streaming", "", "`true` or false")
	fl.StringVarP(&output, "output", "o", "text", "output `FORMAT`: text or json")
	return cmd
}

func newShowCmd() *cobra.Command {
	var (
		s            serverFlags
		repo, output string
	)
	cmd := &cobra.Command{
		Use:   "show --repository REPO",
		Short: "Show whether streaming is on for a repository and the images the service converted",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if repo == "" {
				return usageError{errors.New("--repository is required")}
			}
			c, err := s.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), s.timeout)
			defer cancel()
			r, err := c.Repository(ctx, repo)
			if err != nil {
				return serverError(err)
			}
			return printRepo(cmd.OutOrStdout(), output, r)
		},
	}
	fl := cmd.Flags()
	s.add(fl)
	fl.StringVar(&repo, "repository", "", "repository `NAME` (host/path)")
	fl.StringVarP(&output, "output", "o", "text", "output `FORMAT`: text or json")
	return cmd
}

func newListCmd() *cobra.Command {
	var (
		s      serverFlags
		all    bool
		output string
	)
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List repositories with streaming enabled and their converted images (service)",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			c, err := s.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), s.timeout)
			defer cancel()
			repos, err := c.Repositories(ctx, all)
			if err != nil {
				return serverError(err)
			}
			if output == "json" {
				for i := range repos {
					writeJSON(cmd.OutOrStdout(), repos[i])
				}
				return nil
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "REPOSITORY\tSTREAMING\tIMAGE\tARTIFACT")
			for _, r := range repos {
				if len(r.Images) == 0 {
					fmt.Fprintf(tw, "%s\t%t\t-\t-\n", r.Name, r.Streaming)
				}
				for _, im := range r.Images {
					fmt.Fprintf(tw, "%s\t%t\t%s\t%s\n", r.Name, r.Streaming, im.Image, im.Artifact)
				}
			}
			return tw.Flush()
		},
	}
	fl := cmd.Flags()
	s.add(fl)
	fl.BoolVar(&all, "all", false, "include repositories with streaming turned off")
	fl.StringVarP(&output, "output", "o", "text", "output `FORMAT`: text or json (JSON lines)")
	return cmd
}

func newDeleteCmd() *cobra.Command {
	var (
		s             serverFlags
		image, output string
	)
	cmd := &cobra.Command{
		Use:   "delete --image IMAGE",
		Short: "Delete IMAGE's streaming artifacts (every platform), leaving the image (service)",
		Long: `delete removes the streaming artifacts that refer to IMAGE's manifests (each
platform of an index) and drops them from its referrers; the image itself is
untouched. The registry must allow deletes.`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if image == "" {
				return usageError{errors.New("--image is required")}
			}
			if _, err := parseRef(image); err != nil {
				return err
			}
			c, err := s.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), s.timeout)
			defer cancel()
			res, err := c.DeleteArtifacts(ctx, image)
			if err != nil {
				return serverError(err)
			}
			if output == "json" {
				writeJSON(cmd.OutOrStdout(), res)
				return nil
			}
			for _, d := range res.Deleted {
				fmt.Fprintf(cmd.OutOrStdout(), "%s\tdeleted\n", d)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	s.add(fl)
	fl.StringVar(&image, "image", "", "`IMAGE` whose streaming artifacts go")
	fl.StringVarP(&output, "output", "o", "text", "output `FORMAT`: text or json")
	return cmd
}

func printRepo(w io.Writer, output string, r *service.Repository) error {
	if output == "json" {
		writeJSON(w, r)
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Repository:\t%s\n", r.Name)
	fmt.Fprintf(tw, "Streaming:\t%t\n", r.Streaming)
	for _, im := range r.Images {
		fmt.Fprintf(tw, "Image:\t%s artifact %s\n", im.Image, im.Artifact)
	}
	return tw.Flush()
}
