package main

import (
	"fmt"
	"text/tabwriter"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
)

func newReferrersCmd(g *globalFlags) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "referrers IMAGE",
		Short: "List the referrers of IMAGE (and of each platform manifest of an index)",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			ref, err := parseRef(args[0])
			if err != nil {
				return err
			}
			c, err := g.client(ref)
			if err != nil {
				return err
			}
			rows, err := listReferrers(cmd, c, ref)
			if err != nil {
				return err
			}
			if output == "json" {
				for _, r := range rows {
					writeJSON(cmd.OutOrStdout(), r)
				}
				return nil
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PLATFORM\tSUBJECT\tARTIFACT TYPE\tDIGEST\tSIZE\tCREATED")
			for _, r := range rows {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", orDash(r.Platform), shortDigest(r.Subject), orDash(r.ArtifactType), r.Digest, r.Size, orDash(r.Created))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output `FORMAT`: text or json (JSON lines)")
	return cmd
}

type referrerRow struct {
	Platform     string `json:"platform,omitempty"`
	Subject      string `json:"subject"`
	ArtifactType string `json:"artifactType"`
	Digest       string `json:"digest"`
	Size         int64  `json:"size"`
	Created      string `json:"created,omitempty"`
}

func listReferrers(cmd *cobra.Command, c *fetcher.Client, ref fetcher.Ref) ([]referrerRow, error) {
	ctx := cmd.Context()
	top, err := c.Resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	type subject struct {
		platform string
		desc     ocispec.Descriptor
	}
	subjects := []subject{{desc: top}}
	if fetcher.IsIndex(top.MediaType) {
		ims, err := c.ImageManifests(ctx, ref.WithDigest(top.Digest), "")
		if err != nil {
			return nil, err
		}
		for _, im := range ims {
			subjects = append(subjects, subject{platform: fetcher.PlatformString(im.Platform), desc: im.Descriptor})
		}
	}
	rows := []referrerRow{}
	for _, s := range subjects {
		refs, err := c.Referrers(ctx, ref, s.desc, "")
		if err != nil {
			return nil, err
		}
		for _, d := range refs {
			rows = append(rows, referrerRow{
				Platform: s.platform, Subject: s.desc.Digest.String(), ArtifactType: d.ArtifactType,
				Digest: d.Digest.String(), Size: d.Size, Created: d.Annotations[artifact.AnnotationCreated],
			})
		}
	}
	return rows, nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
