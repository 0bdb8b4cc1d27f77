package integration

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/integration/harness"
	"github.com/streamer-dev/streamer/internal/testenv"
)

// Exit codes of the streamer CLI (cmd/streamer).
const (
	exitGeneric     = 1
	exitUsage       = 2
	exitNotFound    = 3
	exitUnauthz     = 4
	exitUnreachable = 5
	exitDigest      = 6
	exitMediaType   = 7
)

// checkArtifact asserts that subject has exactly one streaming artifact in
// repo and that it covers the image's layers in order.
func checkArtifact(t *testing.T, ctx context.Context, rc registryClient, repo string, img harness.BuiltImage, subject digest.Digest) *artifact.Manifest {
	t.Helper()
	arts := rc.artifactsFor(t, ctx, repo, subject)
	if len(arts) != 1 {
		t.Fatalf("artifacts for %s@%s: got %d, want 1", repo, subject, len(arts))
	}
	m := arts[0]
	if len(m.Layers) != len(img.Layers) {
		t.Fatalf("artifact has %d layers, image %d", len(m.Layers), len(img.Layers))
	}
	for i, l := range img.Layers {
		if m.Layers[i].Original != l.Digest || m.Layers[i].DiffID != l.DiffID {
			t.Errorf("artifact layer %d: original %s diffID %s, want %s %s", i, m.Layers[i].Original, m.Layers[i].DiffID, l.Digest, l.DiffID)
		}
	}
	return m
}

func writes(paths []string) []string {
	var out []string
	for _, p := range paths {
		if strings.HasPrefix(p, "PUT ") || strings.HasPrefix(p, "POST ") || strings.HasPrefix(p, "PATCH ") || strings.HasPrefix(p, "DELETE ") {
			out = append(out, p)
		}
	}
	return out
}

// TestCreate converts a multi-layer image, finds the artifact through the
// referrers tag fallback, inspects it, and converts again without pushing.
func TestCreate(t *testing.T) {
	t.Parallel()
	needBinaries(t)
	ctx := testContext(t, 3*time.Minute)
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	proxy := testenv.CountingProxy(t, reg.Host)
	lay := harness.BuildAndPush(t, layoutDir(t, "rich"), reg.Ref("app", ":v1"), harness.PushOptions{}, richImage(t))
	img := lay.Images[0]
	ref := proxy.Host + "/app:v1"

	if res := streamer(t, ctx, nil, "create", ref); res.Code != 0 {
		t.Fatalf("streamer create: %s", res)
	}
	if len(writes(proxy.Paths())) == 0 {
		t.Fatalf("first create pushed nothing: %v", proxy.Paths())
	}
	rc := registryClient{host: reg.Host}
	checkArtifact(t, ctx, rc, "app", img, img.Manifest.Digest)
	if !harness.TagExists(reg.Dir, "app", artifact.TagFallback(img.Manifest.Digest)) {
		t.Fatalf("no referrers fallback tag; tags: %v", harness.Tags(reg.Dir, "app"))
	}
	refs := rc.referrers(t, ctx, "app", img.Manifest.Digest)

	t.Run("referrers", func(t *testing.T) {
		res := streamer(t, ctx, nil, "referrers", ref)
		if res.Code != 0 {
			t.Fatalf("streamer referrers: %s", res)
		}
		for _, d := range refs {
			if !strings.Contains(res.Stdout, d.Digest.Encoded()[:12]) {
				t.Errorf("referrers output does not name %s (%s):\n%s", d.Digest, d.ArtifactType, res.Stdout)
			}
		}
	})
	t.Run("inspect", func(t *testing.T) {
		res := streamer(t, ctx, nil, "inspect", ref)
		if res.Code != 0 {
			t.Fatalf("streamer inspect: %s", res)
		}
		for _, l := range img.Layers {
			if !strings.Contains(res.Stdout, l.Digest.Encoded()[:12]) {
				t.Errorf("inspect does not show layer %s:\n%s", l.Digest, res.Stdout)
			}
		}
	})
	t.Run("second create pushes nothing", func(t *testing.T) {
		proxy.ResetCounters()
		if res := streamer(t, ctx, nil, "create", ref); res.Code != 0 {
			t.Fatalf("second streamer create: %s", res)
		}
		if w := writes(proxy.Paths()); len(w) != 0 {
			t.Fatalf("second create wrote to the registry: %v", w)
		}
		checkArtifact(t, ctx, rc, "app", img, img.Manifest.Digest)
	})
}

// TestCreateFormats converts a Docker schema 2 image and a multi-platform
// index (one artifact per platform).
func TestCreateFormats(t *testing.T) {
	t.Parallel()
	needBinaries(t)
	ctx := testContext(t, 3*time.Minute)
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	rc := registryClient{host: reg.Host}
	web, err := harness.WebImage("formats", 8080)
	if err != nil {
		t.Fatal(err)
	}
	arm := web
	arm.Architecture = "arm64"
	arm.Layers = append(append([][]harness.File{}, web.Layers...), []harness.File{harness.Reg("arch", 0o644, []byte("arm64"))})

	t.Run("docker schema2", func(t *testing.T) {
		lay := harness.BuildAndPush(t, layoutDir(t, "v2s2"), reg.Ref("docker", ":v1"), harness.PushOptions{Docker: true}, web)
		body, mt, found, err := rc.manifest(ctx, "docker", "v1")
		if err != nil || !found {
			t.Fatalf("read pushed manifest: %v", err)
		}
		if !strings.Contains(mt, "docker") {
			t.Fatalf("pushed manifest is %s, want Docker schema 2", mt)
		}
		if res := streamer(t, ctx, nil, "create", reg.Ref("docker", ":v1")); res.Code != 0 {
			t.Fatalf("streamer create: %s", res)
		}
		img := lay.Images[0]
		// skopeo rewrote the manifest; layer blobs are unchanged.
		checkArtifact(t, ctx, rc, "docker", img, digest.FromBytes(body))
	})
	t.Run("multi-platform index", func(t *testing.T) {
		lay := harness.BuildAndPush(t, layoutDir(t, "index"), reg.Ref("multi", ":v1"), harness.PushOptions{}, web, arm)
		if res := streamer(t, ctx, nil, "create", reg.Ref("multi", ":v1")); res.Code != 0 {
			t.Fatalf("streamer create: %s", res)
		}
		for _, img := range lay.Images {
			t.Logf("platform %s/%s manifest %s", img.Platform.OS, img.Platform.Architecture, img.Manifest.Digest)
			checkArtifact(t, ctx, rc, "multi", img, img.Manifest.Digest)
		}
		if arts := rc.artifactsFor(t, ctx, "multi", lay.Index.Digest); len(arts) != 0 {
			t.Fatalf("the index itself got %d artifacts, want none (artifacts are per platform)", len(arts))
		}
	})
}

// TestCreateAuth converts images in registries that require basic or bearer
// token auth, with good and refused credentials.
func TestCreateAuth(t *testing.T) {
	t.Parallel()
	needBinaries(t)
	ctx := testContext(t, 3*time.Minute)
	users := map[string]string{"alice": "wonderland"}
	web, err := harness.WebImage("auth", 8080)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts testenv.RegistryOptions
	}{
		{"basic", testenv.RegistryOptions{Htpasswd: users}},
		{"token", testenv.RegistryOptions{Htpasswd: users, Token: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := testenv.Registry(t, tc.opts)
			lay := harness.BuildAndPush(t, layoutDir(t, "img"), reg.Ref("auth", ":v1"), harness.PushOptions{Username: "alice", Password: "wonderland"}, web)
			fallback := artifact.TagFallback(lay.Images[0].Manifest.Digest)
			ref := reg.Ref("auth", ":v1")

			for _, bad := range []struct {
				name string
				env  []string
			}{
				{"no credentials", nil},
				{"wrong password", []string{"STREAMER_REGISTRY_USERNAME=alice", "STREAMER_REGISTRY_PASSWORD=nope"}},
				{"unknown user", []string{"STREAMER_REGISTRY_USERNAME=mallory", "STREAMER_REGISTRY_PASSWORD=wonderland"}},
			} {
				res := streamer(t, ctx, bad.env, "create", ref)
				if res.Code != exitUnauthz {
					t.Errorf("%s: want exit %d (unauthorized): %s", bad.name, exitUnauthz, res)
				}
				if harness.TagExists(reg.Dir, "auth", fallback) {
					t.Fatalf("%s: an artifact was pushed", bad.name)
				}
			}
			good := []string{"STREAMER_REGISTRY_USERNAME=alice", "STREAMER_REGISTRY_PASSWORD=wonderland"}
			if res := streamer(t, ctx, good, "create", ref); res.Code != 0 {
				t.Fatalf("create with good credentials: %s", res)
			}
			if !harness.TagExists(reg.Dir, "auth", fallback) {
				t.Fatalf("no artifact after create; tags: %v", harness.Tags(reg.Dir, "auth"))
			}
			if res := streamer(t, ctx, good, "inspect", ref); res.Code != 0 {
				t.Fatalf("inspect with good credentials: %s", res)
			}
		})
	}
}

// TestCreateErrors checks that each bad input ends with its exit code and
// leaves no artifact behind.
func TestCreateErrors(t *testing.T) {
	t.Parallel()
	needBinaries(t)
	ctx := testContext(t, 3*time.Minute)
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	web, err := harness.WebImage("errors", 8080, []harness.File{harness.Reg("payload", 0o644, harness.RandomBytes(3, 200<<10))})
	if err != nil {
		t.Fatal(err)
	}
	good := harness.BuildAndPush(t, layoutDir(t, "good"), reg.Ref("good", ":v1"), harness.PushOptions{}, web)

	// A layer blob whose bytes no longer match its digest: the gzip header's
	// OS byte changes, so the stream still decompresses to the same tar and
	// only the digest check can tell.
	corrupt := harness.BuildAndPush(t, layoutDir(t, "corrupt"), reg.Ref("corrupt", ":v1"), harness.PushOptions{}, web)
	last := corrupt.Images[0].Layers[len(corrupt.Images[0].Layers)-1]
	blob := harness.BlobPath(reg.Dir, last.Digest)
	data, err := os.ReadFile(blob)
	if err != nil {
		t.Fatalf("read stored blob: %v", err)
	}
	data[9] ^= 0x01
	if err := os.WriteFile(blob, data, 0o644); err != nil {
		t.Fatal(err)
	}

	odd := web
	odd.LayerMediaType = "application/vnd.example.layer.v1.tar+lz4"
	unsupported := harness.BuildAndPush(t, layoutDir(t, "odd"), reg.Ref("odd", ":v1"), harness.PushOptions{}, odd)

	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		want int
		repo string
		lay  *harness.Layout
	}{
		{"no arguments", []string{"create"}, exitUsage, "", nil},
		{"unknown flag", []string{"create", "--no-such-flag", reg.Ref("good", ":v1")}, exitUsage, "", nil},
		{"missing tag", []string{"create", reg.Ref("good", ":missing")}, exitNotFound, "good", &good},
		{"missing repository", []string{"create", reg.Ref("nothere", ":v1")}, exitNotFound, "", nil},
		{"unreachable registry", []string{"create", fmt.Sprintf("127.0.0.1:%d/app:v1", port)}, exitUnreachable, "", nil},
		{"layer digest mismatch", []string{"create", reg.Ref("corrupt", ":v1")}, exitDigest, "corrupt", &corrupt},
		{"unsupported media type", []string{"create", reg.Ref("odd", ":v1")}, exitMediaType, "odd", &unsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := streamer(t, ctx, nil, tc.args...)
			if res.Code != tc.want {
				t.Errorf("want exit %d: %s", tc.want, res)
			}
			if res.Code != 0 && strings.TrimSpace(res.Stderr) == "" {
				t.Errorf("failed without saying why on stderr")
			}
			if tc.lay != nil {
				fb := artifact.TagFallback(tc.lay.Images[0].Manifest.Digest)
				if harness.TagExists(reg.Dir, tc.repo, fb) {
					t.Errorf("an artifact was left behind (tag %s)", fb)
				}
			}
		})
	}
	if harness.TagExists(reg.Dir, "good", artifact.TagFallback(good.Images[0].Manifest.Digest)) {
		t.Errorf("failed commands created an artifact for the good image")
	}
}
