package fetcher

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// testCtx is a context bounded for one test.
func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// newClient returns a Client with short retry backoff for tests.
func newClient(t *testing.T, opts Options) *Client {
	t.Helper()
	opts.backoff = 5 * time.Millisecond
	if opts.DockerConfig == "" {
		opts.DockerConfig = t.TempDir() + "/config.json" // never the machine's
	}
	c, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func mustRef(t *testing.T, s string) Ref {
	t.Helper()
	r, err := ParseRef(s)
	if err != nil {
		t.Fatalf("ParseRef(%q): %v", s, err)
	}
	return r
}

// pushBlob pushes b into ref's repository and returns its descriptor.
func pushBlob(t *testing.T, c *Client, ref Ref, mediaType string, b []byte) ocispec.Descriptor {
	t.Helper()
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if err := c.PushBlob(testCtx(t), ref, d, bytes.NewReader(b)); err != nil {
		t.Fatalf("PushBlob: %v", err)
	}
	return d
}

// testImage is an image pushed by pushImage.
type testImage struct {
	Desc   ocispec.Descriptor
	Layers [][]byte
	Layer  ocispec.Descriptor // first layer
}

// pushImage pushes a one-layer image for platform ("linux/amd64") as an OCI
// or Docker schema 2 manifest, tagged tag ("" = by digest).
func pushImage(t *testing.T, c *Client, ref Ref, platform string, docker bool, tag string, layerSize int) testImage {
	t.Helper()
	p := mustPlatform(t, platform)
	layer := randomBytes(t, layerSize)
	cfgMT, layerMT, manMT := ocispec.MediaTypeImageConfig, ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageManifest
	if docker {
		cfgMT, layerMT, manMT = MediaTypeDockerConfig, "application/vnd.docker.image.rootfs.diff.tar.gzip", MediaTypeDockerManifest
	}
	cfg, _ := json.Marshal(ocispec.Image{Platform: p, RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.FromBytes(layer)}}})
	cd := pushBlob(t, c, ref, cfgMT, cfg)
	ld := pushBlob(t, c, ref, layerMT, layer)
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: manMT, Config: cd, Layers: []ocispec.Descriptor{ld}}
	b, _ := json.Marshal(m)
	desc, err := c.PushManifest(testCtx(t), ref, manMT, b, tag)
	if err != nil {
		t.Fatalf("PushManifest: %v", err)
	}
	desc.Platform = &p
	return testImage{Desc: desc, Layers: [][]byte{layer}, Layer: ld}
}

func mustPlatform(t *testing.T, s string) ocispec.Platform {
	t.Helper()
	var p ocispec.Platform
	parts := bytes.Split([]byte(s), []byte("/"))
	p.OS, p.Architecture = string(parts[0]), string(parts[1])
	if len(parts) > 2 {
		p.Variant = string(parts[2])
	}
	return p
}

// pushIndex pushes an index (OCI or Docker list) of manifests under tag.
func pushIndex(t *testing.T, c *Client, ref Ref, docker bool, tag string, manifests ...ocispec.Descriptor) ocispec.Descriptor {
	t.Helper()
	mt := ocispec.MediaTypeImageIndex
	if docker {
		mt = MediaTypeDockerManifestList
	}
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: mt, Manifests: manifests}
	b, _ := json.Marshal(idx)
	d, err := c.PushManifest(testCtx(t), ref, mt, b, tag)
	if err != nil {
		t.Fatalf("PushManifest index: %v", err)
	}
	return d
}

func writeFile(path string, b []byte) error { return os.WriteFile(path, b, 0o600) }
