// Package integration holds Streamer's end-to-end tests: the streamer CLI
// against a real registry, and a node made of containerd, runc and
// streamer-snapshotter driven through CRI as kubelet would. The processes
// are started and stopped by the tests (see integration/harness).
package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/integration/harness"
)

var (
	bins     harness.Binaries
	buildErr error
)

// TestMain builds the commands once for every test; a test that needs them
// fails with the build error.
// harness.EnvBinDir names a directory of already built commands to use
// instead (for iterating on the tests).
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("/tmp", "sb-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: temp dir:", err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	bins, buildErr = harness.BuildBinaries(ctx, dir)
	cancel()
	if buildErr != nil {
		fmt.Fprintln(os.Stderr, "integration: BUILD FAILED:", buildErr)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// needBinaries fails the test when the commands did not build.
func needBinaries(t *testing.T) harness.Binaries {
	t.Helper()
	if buildErr != nil {
		t.Fatalf("the streamer commands did not build: %v", buildErr)
	}
	return bins
}

// needRoot skips loudly when the test cannot run containers and FUSE.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("SKIP: needs root (containerd, runc, FUSE mounts)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("SKIP: /dev/fuse is missing")
	}
}

// testContext is a test's deadline: every end-to-end test is bounded.
func testContext(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// cliResult is the outcome of one streamer command.
type cliResult struct {
	Stdout, Stderr string
	Code           int
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.Code, r.Stdout, r.Stderr)
}

// streamer runs the streamer CLI with extra environment variables.
func streamer(t *testing.T, ctx context.Context, env []string, args ...string) cliResult {
	t.Helper()
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, b.Streamer, args...)
	home := t.TempDir()
	cmd.Env = append(append(cleanEnv(), "HOME="+home, "XDG_CACHE_HOME="+filepath.Join(home, ".cache"), "DOCKER_CONFIG="+filepath.Join(home, ".docker")), env...)
	cmd.WaitDelay = 5 * time.Second
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	res := cliResult{Stdout: out.String(), Stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		res.Code = ee.ExitCode()
	default:
		t.Fatalf("run streamer %v: %v", args, err)
	}
	t.Logf("streamer %s -> exit %d", strings.Join(args, " "), res.Code)
	return res
}

// cleanEnv is the environment without registry credentials of the caller.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "STREAMER_") || strings.HasPrefix(kv, "DOCKER_CONFIG=") || strings.HasPrefix(kv, "REGISTRY_AUTH_FILE=") ||
			strings.HasPrefix(kv, "HOME=") || strings.HasPrefix(kv, "XDG_CACHE_HOME=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// registryClient reads a plain-HTTP registry (optionally with basic auth).
type registryClient struct {
	host, user, pass string
}

var manifestAccept = strings.Join([]string{
	ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageIndex,
	"application/vnd.docker.distribution.manifest.v2+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
}, ", ")

// manifest GETs /v2/repo/manifests/ref; found is false on 404.
func (c registryClient) manifest(ctx context.Context, repo, ref string) (body []byte, mediaType string, found bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.host+"/v2/"+repo+"/manifests/"+ref, nil)
	if err != nil {
		return nil, "", false, err
	}
	req.Header.Set("Accept", manifestAccept)
	if c.user != "" {
		req.SetBasicAuth(c.user, c.pass)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, "", false, fmt.Errorf("get manifest %s:%s: %w", repo, ref, err)
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, "", false, err
	}
	switch resp.StatusCode {
	case http.StatusOK:
		return body, resp.Header.Get("Content-Type"), true, nil
	case http.StatusNotFound:
		return nil, "", false, nil
	default:
		return nil, "", false, fmt.Errorf("get manifest %s:%s: %s: %s", repo, ref, resp.Status, body)
	}
}

// referrers lists the descriptors in subject's referrers tag fallback index
// (distribution 2.8 has no referrers API); nil when there is none.
func (c registryClient) referrers(t *testing.T, ctx context.Context, repo string, subject digest.Digest) []ocispec.Descriptor {
	t.Helper()
	body, _, found, err := c.manifest(ctx, repo, artifact.TagFallback(subject))
	if err != nil {
		t.Fatalf("%v", err)
	}
	if !found {
		return nil
	}
	var idx ocispec.Index
	if err := json.Unmarshal(body, &idx); err != nil {
		t.Fatalf("decode referrers index %s: %v", artifact.TagFallback(subject), err)
	}
	return idx.Manifests
}

// artifactsFor lists the streaming artifacts referring to subject, through
// the referrers tag fallback, each parsed and validated.
func (c registryClient) artifactsFor(t *testing.T, ctx context.Context, repo string, subject digest.Digest) []*artifact.Manifest {
	t.Helper()
	var out []*artifact.Manifest
	for _, d := range c.referrers(t, ctx, repo, subject) {
		if d.ArtifactType != artifact.ArtifactType {
			continue
		}
		mb, _, found, err := c.manifest(ctx, repo, d.Digest.String())
		if err != nil || !found {
			t.Fatalf("referrers index names %s, which cannot be read: found=%v %v", d.Digest, found, err)
		}
		if got := digest.FromBytes(mb); got != d.Digest {
			t.Fatalf("artifact manifest %s has digest %s", d.Digest, got)
		}
		m, err := artifact.ParseManifest(mb)
		if err != nil {
			t.Fatalf("artifact %s: %v", d.Digest, err)
		}
		if m.Subject.Digest != subject {
			t.Fatalf("artifact %s listed for %s has subject %s", d.Digest, subject, m.Subject.Digest)
		}
		out = append(out, m)
	}
	return out
}

// tempDir is a short temporary directory (socket paths), cleaned up after
// unmounting anything left in it.
func tempDir(t *testing.T, prefix string) string {
	t.Helper()
	return harness.ShortTempDir(t, prefix)
}

// layoutDir is where a test writes an OCI layout.
func layoutDir(t *testing.T, name string) string {
	return filepath.Join(t.TempDir(), name)
}
