package main

import (
	"fmt"
	"io"
	"runtime/debug"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/streamer-dev/streamer/config"
	"github.com/streamer-dev/streamer/fetcher"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

// globalFlags are the flags every registry command shares.
type globalFlags struct {
	insecure   []string
	configPath string
	logLevel   string
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:   "streamer",
		Short: "Convert container images into streaming artifacts and inspect them",
		Long: `streamer converts an image in a registry into a streaming artifact: per layer
a streaming blob (independent zstd frames whose decompression is the original
layer tar) and a table of contents, pushed into the image's repository as an
OCI referrer of the image manifest. streamer-snapshotter mounts such images
lazily on nodes.

Credentials: STREAMER_REGISTRY_USERNAME and STREAMER_REGISTRY_PASSWORD, the
[registry.credentials] of --config, or the docker config.json.`,
		SilenceUsage:      true,
		SilenceErrors:     true,
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			return setLogLevel(g.logLevel)
		},
	}
	// Without this, an unknown command would be a generic error, not usage.
	root.Args = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return usageError{fmt.Errorf("unknown command %q for streamer", args[0])}
		}
		return nil
	}
	root.RunE = func(cmd *cobra.Command, args []string) error { return cmd.Help() }
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error { return usageError{err} })
	root.SetUsageTemplate(root.UsageTemplate() + "\n" + exitCodesHelp + "\n")
	pf := root.PersistentFlags()
	pf.StringArrayVar(&g.insecure, "insecure", nil, "registry `HOST` (host or host:port) reached over plain HTTP or unverified TLS; repeatable (loopback hosts always are)")
	pf.StringVar(&g.configPath, "config", "", "TOML `FILE` whose [registry] and [fetch] sections configure registry access (the snapshotter's config file)")
	pf.StringVar(&g.logLevel, "log-level", "warn", "log `LEVEL`: trace, debug, info, warn, error")

	root.AddCommand(newCreateCmd(g), newReferrersCmd(g), newInspectCmd(g), newPullCmd(g), newVersionCmd())
	root.AddCommand(newStatusCmd())
	root.AddCommand(newProfileCmd(), newRecordCmd(g))
	root.AddCommand(newServeCmd(g), newOperationCmd(), newUpdateCmd(), newShowCmd(), newListCmd(), newDeleteCmd())
	return root
}

func setLogLevel(level string) error {
	if err := log.SetLevel(level); err != nil {
		return usageError{fmt.Errorf("--log-level %q: %w", level, err)}
	}
	return nil
}

// exactArgs is cobra.ExactArgs returning a usage error.
func exactArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if err := cobra.ExactArgs(n)(cmd, args); err != nil {
			return usageError{err}
		}
		return nil
	}
}

// client builds a registry client from the flags and the config file for
// the image reference ref.
func (g *globalFlags) client(ref fetcher.Ref) (*fetcher.Client, error) {
	opts := fetcher.Options{Insecure: g.insecure}
	if g.configPath != "" {
		d, err := config.LoadDaemon(g.configPath)
		if err != nil {
			return nil, usageError{err}
		}
		r := d.Registry
		opts.Insecure = append(opts.Insecure, r.Insecure...)
		opts.Mirrors = r.Mirrors
		opts.CAFiles = r.CAFiles
		opts.DockerConfig = r.DockerConfig
		opts.HostCredentials = map[string]fetcher.Credential{}
		for host, cred := range r.Credentials {
			opts.HostCredentials[host] = fetcher.Credential{Username: cred.Username, Password: cred.Password}
		}
		opts.Timeout = time.Duration(d.Fetch.Timeout)
		opts.Retries = d.Fetch.Retries
	}
	c, err := fetcher.New(opts)
	if err != nil {
		return nil, fmt.Errorf("registry client: %w", err)
	}
	return c, nil
}

// parseRef parses an image argument.
func parseRef(s string) (fetcher.Ref, error) {
	ref, err := fetcher.ParseRef(s)
	if err != nil {
		return ref, usageError{err}
	}
	return ref, nil
}

// output is a validated --output value.
func checkOutput(o string) error {
	if o != "text" && o != "json" {
		return usageError{fmt.Errorf("--output %q: want text or json", o)}
	}
	return nil
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			fmt.Fprintln(cmd.OutOrStdout(), "streamer "+versionString())
			return nil
		},
	}
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}
