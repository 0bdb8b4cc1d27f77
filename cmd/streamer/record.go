package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/cio"
	"github.com/containerd/containerd/images"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/oci"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/remotes"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spf13/cobra"

	"github.com/streamer-dev/streamer/converter"
	"github.com/streamer-dev/streamer/fetcher"
)

// recordOptions are the flags of `streamer record`.
type recordOptions struct {
	address, namespace, snapshotter string
	snapshotterAddress              string
	readyHTTP, readyLog             string
	readyAfter                      time.Duration
	out                             string
	ignoreMissing                   bool
	timeout                         time.Duration
}

func newRecordCmd(g *globalFlags) *cobra.Command {
	o := &recordOptions{}
	cmd := &cobra.Command{
		Use:   "record IMAGE --snapshotter-address ADDR (--ready-http URL | --ready-log REGEX | --ready-after DURATION)",
		Short: "Run IMAGE once through containerd and Streamer, record the files it reads until ready, and write them into its streaming artifact",
		Long: `record learns IMAGE's startup profile from a real start: it pulls IMAGE through
containerd into the streamer snapshotter (in its own containerd namespace, so
every layer is mounted afresh), runs it with host networking until it is
ready, stops and removes it, asks the snapshotter (--snapshotter-address, its
metrics_address) which files were read first, in order, and writes them into
the image's streaming artifact as its prefetch list: a new artifact revision
that replaces the old one (see create --prefetch-list).

Readiness is one of: --ready-http URL (the URL answers with a status below
500), --ready-log REGEX (a line of the container's output matches) or
--ready-after DURATION. The image must have a streaming artifact already
(streamer create IMAGE). Everything is bounded by --timeout.`,
		Example: "  streamer record --address /run/containerd/containerd.sock --snapshotter-address /run/streamer-snapshotter/metrics.sock \\\n    --ready-http http://127.0.0.1:8080/ registry.example.com/team/web:1.0",
		Args:    exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runRecord(cmd, g, o, args[0])
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.address, "address", "/run/containerd/containerd.sock", "containerd's gRPC `SOCKET`")
	f.StringVarP(&o.namespace, "namespace", "n", "streamer-record", "containerd `NAMESPACE` to run in (its own, so that layers mount afresh; the image is removed from it afterwards)")
	f.StringVar(&o.snapshotter, "snapshotter", "streamer", "containerd snapshotter `NAME` (the proxy_plugins name)")
	f.StringVar(&o.snapshotterAddress, "snapshotter-address", "", "streamer-snapshotter's metrics_address: unix socket `PATH`, host:port or http:// URL")
	f.StringVar(&o.readyHTTP, "ready-http", "", "ready when `URL` answers (status below 500)")
	f.StringVar(&o.readyLog, "ready-log", "", "ready when the container's output has a line matching `REGEX`")
	f.DurationVar(&o.readyAfter, "ready-after", 0, "ready after `DURATION` of running")
	f.StringVar(&o.out, "prefetch-list-out", "", "also write the recorded list to `FILE` (the create --prefetch-list format)")
	f.BoolVar(&o.ignoreMissing, "prefetch-ignore-missing", false, "ignore recorded paths the image's merged filesystem does not have")
	f.DurationVar(&o.timeout, "timeout", 5*time.Minute, "time limit of the whole recording")
	return cmd
}

// readiness waits until the started container is ready.
type readiness func(ctx context.Context, logPath string) error

func (o *recordOptions) readiness() (readiness, error) {
	n := 0
	for _, set := range []bool{o.readyHTTP != "", o.readyLog != "", o.readyAfter > 0} {
		if set {
			n++
		}
	}
	if n != 1 {
		return nil, usageError{errors.New("give exactly one of --ready-http, --ready-log, --ready-after")}
	}
	poll := func(ctx context.Context, what string, ok func(ctx context.Context) bool) error {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			if ok(ctx) {
				return nil
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("wait for %s: %w", what, ctx.Err())
			case <-t.C:
			}
		}
	}
	switch {
	case o.readyHTTP != "":
		u, err := url.Parse(o.readyHTTP)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
			return nil, usageError{fmt.Errorf("--ready-http %q: want an http:// or https:// URL", o.readyHTTP)}
		}
		client := &http.Client{Timeout: 2 * time.Second}
		return func(ctx context.Context, _ string) error {
			return poll(ctx, o.readyHTTP+" to answer", func(ctx context.Context) bool {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, o.readyHTTP, nil)
				resp, err := client.Do(req)
				if err != nil {
					return false
				}
				io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
				resp.Body.Close()
				return resp.StatusCode < 500
			})
		}, nil
	case o.readyLog != "":
		re, err := regexp.Compile(o.readyLog)
		if err != nil {
			return nil, usageError{fmt.Errorf("--ready-log: %w", err)}
		}
		return func(ctx context.Context, logPath string) error {
			return poll(ctx, "a log line matching "+o.readyLog, func(context.Context) bool {
				b, err := os.ReadFile(logPath)
				if err != nil {
					return false
				}
				for _, line := range strings.Split(string(b), "\n") {
					if re.MatchString(line) {
						return true
					}
				}
				return false
			})
		}, nil
	default:
		return func(ctx context.Context, _ string) error {
			select {
			case <-time.After(o.readyAfter):
				return nil
			case <-ctx.Done():
				return fmt.Errorf("wait %s: %w", o.readyAfter, ctx.Err())
			}
		}, nil
	}
}

func runRecord(cmd *cobra.Command, g *globalFlags, o *recordOptions, image string) error {
	if o.snapshotterAddress == "" {
		return usageError{errors.New("--snapshotter-address is required")}
	}
	if o.timeout <= 0 {
		return usageError{errors.New("--timeout must be positive")}
	}
	ready, err := o.readiness()
	if err != nil {
		return err
	}
	ref, err := parseRef(image)
	if err != nil {
		return err
	}
	image = ref.String()
	ctx, cancel := context.WithTimeout(cmd.Context(), o.timeout)
	defer cancel()
	reg, err := g.client(ref)
	if err != nil {
		return err
	}
	subject, err := reg.Resolve(ctx, ref)
	if err != nil {
		return fmt.Errorf("resolve %s: %w", image, err)
	}
	if fetcher.IsImageManifest(subject.MediaType) {
		if _, _, err := reg.FindArtifact(ctx, ref, subject); err != nil {
			if errors.Is(err, fetcher.ErrNoArtifact) {
				return fmt.Errorf("%s has no streaming artifact to record into: run `streamer create %s` first: %w", image, image, err)
			}
			return err
		}
	}

	// A profile of earlier starts of the image on this node would mix in.
	if _, err := nodeRequest(ctx, http.MethodDelete, o.snapshotterAddress, "/profile?image="+url.QueryEscape(image)); err != nil {
		return fmt.Errorf("reset the snapshotter's profile of %s: %w", image, err)
	}
	stderr := cmd.ErrOrStderr()
	start := time.Now()
	if err := runUntilReady(ctx, o, image, g.insecure, ready, stderr); err != nil {
		return err
	}
	p, err := fetchProfile(ctx, o.snapshotterAddress, image)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "recorded %d files read by %s until ready (%s)\n", len(p.Files), image, time.Since(start).Round(time.Millisecond))
	if o.out != "" {
		if err := writePrefetchList(o.out, image, p.list()); err != nil {
			return err
		}
	}
	results, err := converter.Convert(ctx, reg, ref, converter.Options{PrefetchList: p.list(), PrefetchIgnoreMissing: o.ignoreMissing})
	for _, r := range results {
		state := "unchanged"
		switch {
		case r.Replaced.Digest != "" && r.ReplacedRemains:
			state = "revised (the older revision remains, superseded)"
		case r.Replaced.Digest != "":
			state = "revised"
		case !r.Existing:
			state = "created"
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\t%s\n", orDash(r.Platform), r.Artifact.Digest, state)
	}
	return err
}

// runUntilReady pulls image into the streamer snapshotter, runs it with
// host networking until ready says so, then stops and removes the
// container, its snapshot and the image from the namespace, whatever
// happened.
func runUntilReady(ctx context.Context, o *recordOptions, image string, insecureHosts []string, ready readiness, stderr io.Writer) (err error) {
	client, err := containerd.New(o.address, containerd.WithTimeout(10*time.Second))
	if err != nil {
		return fmt.Errorf("connect to containerd at %s: %w: %v", o.address, fetcher.ErrUnreachable, err)
	}
	defer client.Close()
	ctx = namespaces.WithNamespace(ctx, o.namespace)
	l := log.G(ctx).WithFields(log.Fields{"image": image, "namespace": o.namespace, "op": "record"})
	// Cleanup runs even when ctx is done, bounded on its own.
	cleanupCtx := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	}

	img, err := client.Pull(ctx, image,
		containerd.WithResolver(newResolver(insecureHosts)),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(o.snapshotter),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(image)),
	)
	if err != nil {
		return fmt.Errorf("pull %s: %w", image, err)
	}
	defer func() {
		cctx, cancel := cleanupCtx()
		defer cancel()
		if derr := client.ImageService().Delete(cctx, img.Name(), images.SynchronousDelete()); derr != nil {
			l.WithError(derr).Warn("remove the recorded image from its namespace")
		}
	}()

	dir, err := os.MkdirTemp("", "streamer-record-")
	if err != nil {
		return fmt.Errorf("record %s: %w", image, err)
	}
	defer os.RemoveAll(dir)
	logPath := filepath.Join(dir, "output.log")
	id := fmt.Sprintf("streamer-record-%d", time.Now().UnixNano())
	container, err := client.NewContainer(ctx, id,
		containerd.WithImage(img),
		containerd.WithSnapshotter(o.snapshotter),
		containerd.WithNewSnapshot(id, img),
		containerd.WithNewSpec(oci.WithImageConfig(img),
			oci.WithHostNamespace(specs.NetworkNamespace), oci.WithHostHostsFile, oci.WithHostResolvconf),
	)
	if err != nil {
		return fmt.Errorf("create a container of %s: %w", image, err)
	}
	defer func() {
		cctx, cancel := cleanupCtx()
		defer cancel()
		if derr := container.Delete(cctx, containerd.WithSnapshotCleanup); derr != nil {
			l.WithError(derr).Warn("remove the recording container")
		}
	}()
	task, err := container.NewTask(ctx, cio.LogFile(logPath))
	if err != nil {
		return fmt.Errorf("create the task of %s: %w", image, err)
	}
	defer func() {
		cctx, cancel := cleanupCtx()
		defer cancel()
		stopTask(cctx, task, l)
	}()
	exited, err := task.Wait(ctx)
	if err != nil {
		return fmt.Errorf("wait for the task of %s: %w", image, err)
	}
	if err := task.Start(ctx); err != nil {
		return fmt.Errorf("start %s: %w", image, err)
	}
	fmt.Fprintf(stderr, "started %s (container %s); waiting until it is ready\n", image, id)
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	readyErr := make(chan error, 1)
	go func() { readyErr <- ready(rctx, logPath) }()
	select {
	case err := <-readyErr:
		if err != nil {
			return fmt.Errorf("%s did not get ready: %w\noutput:\n%s", image, err, tailFile(logPath, 20))
		}
		return nil
	case st := <-exited:
		return fmt.Errorf("%s exited (status %d) before it was ready\noutput:\n%s", image, st.ExitCode(), tailFile(logPath, 20))
	}
}

// stopTask stops a task (SIGTERM, SIGKILL after 5s) and deletes it.
func stopTask(ctx context.Context, task containerd.Task, l *log.Entry) {
	exited, err := task.Wait(ctx)
	if err == nil {
		if err := task.Kill(ctx, syscall.SIGTERM); err == nil {
			select {
			case <-exited:
			case <-time.After(5 * time.Second):
				_ = task.Kill(ctx, syscall.SIGKILL)
				select {
				case <-exited:
				case <-ctx.Done():
				}
			case <-ctx.Done():
			}
		}
	}
	if _, err := task.Delete(ctx, containerd.WithProcessKill); err != nil {
		l.WithError(err).Warn("delete the recording task")
	}
}

// newResolver resolves images for containerd's pull as pull does: plain
// HTTP for loopback and --insecure hosts, credentials from the environment.
func newResolver(insecureHosts []string) remotes.Resolver {
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
	return docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(
			docker.WithPlainHTTP(plainHTTP),
			docker.WithAuthorizer(docker.NewDockerAuthorizer(docker.WithAuthCreds(creds))),
		),
	})
}

// tailFile returns the last n lines of a file.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(no output)"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
