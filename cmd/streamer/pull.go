package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/opencontainers/image-spec/identity"
	"github.com/spf13/cobra"

	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/snapshotter"
)

// pullOptions are the flags of `streamer pull`.
type pullOptions struct {
	address     string
	namespace   string
	snapshotter string
}

func newPullCmd(g *globalFlags) *cobra.Command {
	o := pullOptions{}
	cmd := &cobra.Command{
		Use:   "pull IMAGE",
		Short: "Pull IMAGE through containerd into the streamer snapshotter (layers with a streaming artifact are mounted, not downloaded)",
		Long: `pull pulls IMAGE through containerd, as ctr or nerdctl would, but attaches to
each layer the labels a remote snapshotter needs (those the CRI plugin adds for
kubelet), so streamer-snapshotter mounts the layers of an image that has a
streaming artifact instead of downloading them. It prints how many layers were
streamed.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return pullImage(cmd.Context(), args[0], o, g.insecure, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.address, "address", "/run/containerd/containerd.sock", "containerd's gRPC `SOCKET`")
	f.StringVarP(&o.namespace, "namespace", "n", "k8s.io", "containerd `NAMESPACE` (k8s.io is the one kubelet uses)")
	f.StringVar(&o.snapshotter, "snapshotter", "streamer", "containerd snapshotter `NAME` (the proxy_plugins name)")
	return cmd
}

// pullImage pulls ref through containerd with snapshot labels, unpacks it
// into the snapshotter and reports how many of its layers were streamed.
func pullImage(ctx context.Context, image string, o pullOptions, insecureHosts []string, out io.Writer) error {
	parsed, err := parseRef(image)
	if err != nil {
		return err
	}
	ref := parsed.String()
	client, err := containerd.New(o.address, containerd.WithTimeout(10*time.Second))
	if err != nil {
		return fmt.Errorf("connect to containerd at %s: %w: %v", o.address, fetcher.ErrUnreachable, err)
	}
	defer client.Close()
	ctx = namespaces.WithNamespace(ctx, o.namespace)

	insecure := map[string]bool{}
	for _, h := range insecureHosts {
		insecure[h] = true
	}
	plainHTTP := func(host string) (bool, error) {
		if insecure[host] {
			return true, nil
		}
		return docker.MatchLocalhost(host)
	}
	creds := func(host string) (string, string, error) {
		return os.Getenv(fetcher.EnvUsername), os.Getenv(fetcher.EnvPassword), nil
	}
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(
			docker.WithPlainHTTP(plainHTTP),
			docker.WithAuthorizer(docker.NewDockerAuthorizer(docker.WithAuthCreds(creds))),
		),
	})
	start := time.Now()
	img, err := client.Pull(ctx, ref,
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(o.snapshotter),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	)
	if err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return fmt.Errorf("read rootfs of %s: %w", ref, err)
	}
	sn := client.SnapshotService(o.snapshotter)
	streamed := 0
	for i := range diffIDs {
		info, err := sn.Stat(ctx, identity.ChainID(diffIDs[:i+1]).String())
		if err != nil {
			return fmt.Errorf("stat snapshot of layer %d of %s: %w", i, ref, err)
		}
		if info.Labels[snapshotter.LabelRemote] == "true" {
			streamed++
		}
	}
	fmt.Fprintf(out, "%s: %s\n", ref, img.Target().Digest)
	fmt.Fprintf(out, "layers: %d streamed, %d unpacked (snapshotter %s) in %s\n",
		streamed, len(diffIDs)-streamed, o.snapshotter, time.Since(start).Round(time.Millisecond))
	return nil
}
