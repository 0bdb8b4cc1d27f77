package main

import (
	"bytes"
	"fmt"
	"io"
	"text/tabwriter"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
)

type inspectFlags struct {
	platform string
	layer    int
	files    bool
	output   string
}

func newInspectCmd(g *globalFlags) *cobra.Command {
	f := &inspectFlags{}
	cmd := &cobra.Command{
		Use:   "inspect IMAGE",
		Short: "Show the streaming artifact of IMAGE: per layer its files, chunks and sizes",
		Example: "  streamer inspect registry.example.com/app:1.0\n" +
			"  streamer inspect --platform linux/amd64 --layer 0 --files registry.example.com/app:1.0",
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runInspect(cmd, g, f, args[0])
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.platform, "platform", "", "inspect only this `PLATFORM` of a multi-platform image")
	fl.IntVar(&f.layer, "layer", -1, "with --files: the layer `N` (0 is the bottom layer)")
	fl.BoolVar(&f.files, "files", false, "list the TOC entries of --layer")
	fl.StringVarP(&f.output, "output", "o", "text", "output `FORMAT`: text or json")
	return cmd
}

// layerSummary is one layer of `inspect`.
type layerSummary struct {
	Index        int    `json:"index"`
	Original     string `json:"original"`
	DiffID       string `json:"diffID"`
	Blob         string `json:"blob"`
	TOC          string `json:"toc"`
	Files        int    `json:"files"`
	Dirs         int    `json:"dirs"`
	Symlinks     int    `json:"symlinks"`
	Hardlinks    int    `json:"hardlinks"`
	Other        int    `json:"other"`
	Chunks       int    `json:"chunks"`
	ChunkSize    int64  `json:"chunkSize"`
	Compressed   int64  `json:"compressed"`
	Uncompressed int64  `json:"uncompressed"`
	TOCSize      int64  `json:"tocSize"`
}

type imageSummary struct {
	Platform string         `json:"platform"`
	Subject  string         `json:"subject"`
	Artifact string         `json:"artifact"`
	Created  string         `json:"created"`
	Layers   []layerSummary `json:"layers"`
}

func runInspect(cmd *cobra.Command, g *globalFlags, f *inspectFlags, image string) error {
	if err := checkOutput(f.output); err != nil {
		return err
	}
	if f.files != (f.layer >= 0) {
		return usageError{fmt.Errorf("--files and --layer N go together")}
	}
	ref, err := parseRef(image)
	if err != nil {
		return err
	}
	c, err := g.client(ref)
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	ims, err := c.ImageManifests(ctx, ref, f.platform)
	if err != nil {
		return err
	}
	if f.files && len(ims) > 1 {
		return usageError{fmt.Errorf("%s has %d platforms: choose one with --platform to list files", ref, len(ims))}
	}
	out := cmd.OutOrStdout()
	for _, im := range ims {
		m, desc, err := c.FindArtifact(ctx, ref, im.Descriptor)
		if err != nil {
			return err
		}
		sum := imageSummary{Platform: fetcher.PlatformString(im.Platform), Subject: im.Descriptor.Digest.String(), Artifact: desc.Digest.String(), Created: m.Created.UTC().Format("2006-01-02T15:04:05Z")}
		if f.files {
			if f.layer >= len(m.Layers) {
				return usageError{fmt.Errorf("--layer %d: %s has %d layers (0 to %d)", f.layer, ref, len(m.Layers), len(m.Layers)-1)}
			}
			toc, err := fetchTOC(cmd, c, ref, m.Layers[f.layer])
			if err != nil {
				return err
			}
			return printFiles(out, toc, f.output)
		}
		for i, l := range m.Layers {
			toc, err := fetchTOC(cmd, c, ref, l)
			if err != nil {
				return err
			}
			sum.Layers = append(sum.Layers, summarize(i, l, toc))
		}
		if f.output == "json" {
			writeJSON(out, sum)
			continue
		}
		printSummary(out, sum)
	}
	return nil
}

// fetchTOC fetches and validates a layer's TOC (bounded by the default
// limits whatever the registry sends).
func fetchTOC(cmd *cobra.Command, c *fetcher.Client, ref fetcher.Ref, l artifact.Layer) (*artifact.TOC, error) {
	rc, err := c.FetchBlob(cmd.Context(), ref, ociDesc(l.TOC))
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	// Read whole first so the fetcher verifies the digest before decoding.
	b, err := io.ReadAll(io.LimitReader(rc, l.TOC.Size+1))
	if err != nil {
		return nil, fmt.Errorf("fetch TOC of layer %s: %w", l.Original, err)
	}
	toc, err := artifact.DecodeTOC(bytes.NewReader(b), artifact.Limits{})
	if err != nil {
		return nil, fmt.Errorf("TOC %s of layer %s: %w", l.TOC.Digest, l.Original, err)
	}
	return toc, nil
}

func summarize(i int, l artifact.Layer, toc *artifact.TOC) layerSummary {
	s := layerSummary{
		Index: i, Original: l.Original.String(), DiffID: l.DiffID.String(), Blob: l.Blob.Digest.String(), TOC: l.TOC.Digest.String(),
		Chunks: len(toc.Chunks), ChunkSize: toc.ChunkSize, Compressed: toc.BlobSize, Uncompressed: toc.TarSize, TOCSize: l.TOC.Size,
	}
	for _, e := range toc.Entries {
		switch e.Type {
		case artifact.TypeReg:
			s.Files++
		case artifact.TypeDir:
			s.Dirs++
		case artifact.TypeSymlink:
			s.Symlinks++
		case artifact.TypeHardlink:
			s.Hardlinks++
		default:
			s.Other++
		}
	}
	return s
}

func printSummary(w io.Writer, s imageSummary) {
	fmt.Fprintf(w, "Platform: %s\nImage:    %s\nArtifact: %s\nCreated:  %s\n", orDash(s.Platform), s.Subject, s.Artifact, s.Created)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tORIGINAL\tFILES\tDIRS\tLINKS\tOTHER\tCHUNKS\tCOMPRESSED\tUNCOMPRESSED\tTOC")
	for _, l := range s.Layers {
		fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", l.Index, shortDigest(l.Original), l.Files, l.Dirs, l.Symlinks+l.Hardlinks, l.Other,
			l.Chunks, humanBytes(l.Compressed), humanBytes(l.Uncompressed), humanBytes(l.TOCSize))
	}
	tw.Flush()
	fmt.Fprintln(w)
}

// fileMode renders an entry's type and permissions as ls -l does
// ("-rwsr-xr-x", "drwxrwxrwt"); "h" marks a hardlink entry.
func fileMode(e artifact.Entry) string {
	types := map[artifact.EntryType]byte{
		artifact.TypeReg: '-', artifact.TypeDir: 'd', artifact.TypeSymlink: 'l', artifact.TypeHardlink: 'h',
		artifact.TypeChar: 'c', artifact.TypeBlock: 'b', artifact.TypeFifo: 'p',
	}
	b := []byte("?---------")
	if t, ok := types[e.Type]; ok {
		b[0] = t
	}
	const rwx = "rwx"
	for i := 0; i < 9; i++ {
		if e.Mode&(1<<(8-i)) != 0 {
			b[1+i] = rwx[i%3]
		}
	}
	special := func(bit int64, pos int, set, unset byte) {
		if e.Mode&bit != 0 {
			if b[pos] == '-' {
				b[pos] = unset
			} else {
				b[pos] = set
			}
		}
	}
	special(0o4000, 3, 's', 'S')
	special(0o2000, 6, 's', 'S')
	special(0o1000, 9, 't', 'T')
	return string(b)
}

func printFiles(w io.Writer, toc *artifact.TOC, output string) error {
	if output == "json" {
		for _, e := range toc.Entries {
			writeJSON(w, e)
		}
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', tabwriter.AlignRight)
	for _, e := range toc.Entries {
		name := e.Name
		switch e.Type {
		case artifact.TypeSymlink, artifact.TypeHardlink:
			name += " -> " + e.Linkname
		}
		size := fmt.Sprint(e.Size)
		if e.Type == artifact.TypeChar || e.Type == artifact.TypeBlock {
			size = fmt.Sprintf("%d,%d", e.Devmajor, e.Devminor)
		}
		fmt.Fprintf(tw, "%s\t%d/%d\t%s\t %s\t\n", fileMode(e), e.UID, e.GID, size, name)
	}
	return tw.Flush()
}

func ociDesc(d artifact.Descriptor) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size}
}
