package converter

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/internal/testenv"
)

// newClient returns a fetcher client that never reads the machine's
// docker credentials.
func newClient(t *testing.T) *fetcher.Client {
	t.Helper()
	c, err := fetcher.New(fetcher.Options{DockerConfig: filepath.Join(t.TempDir(), "config.json"), Timeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("fetcher.New: %v", err)
	}
	return c
}

func mustRef(t *testing.T, s string) fetcher.Ref {
	t.Helper()
	r, err := fetcher.ParseRef(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// testLayer is an original image layer: its tar and how it is stored.
type testLayer struct {
	tar       []byte
	mediaType string
}

func gzipped(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zstded(t *testing.T, b []byte) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(b, nil)
}

// blob returns the layer as stored in the registry.
func (l testLayer) blob(t *testing.T) []byte {
	t.Helper()
	switch {
	case strings.HasSuffix(l.mediaType, "gzip"):
		return gzipped(t, l.tar)
	case strings.HasSuffix(l.mediaType, "zstd"):
		return zstded(t, l.tar)
	}
	return l.tar
}

// pushBytes pushes b as a blob of ref's repository.
func pushBytes(t *testing.T, c *fetcher.Client, ref fetcher.Ref, mediaType string, b []byte) ocispec.Descriptor {
	t.Helper()
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if err := c.PushBlob(testContext(t), ref, d, bytes.NewReader(b)); err != nil {
		t.Fatalf("push blob: %v", err)
	}
	return d
}

// imageSpec describes a test image to push.
type imageSpec struct {
	platform string
	docker   bool
	layers   []testLayer
	diffIDs  []digest.Digest // default: the layers' true diffIDs
}

// pushImage builds an image in Go (config, layers, manifest) and pushes it
// to ref's repository, tagged tag ("" = by digest only).
func pushImage(t *testing.T, c *fetcher.Client, ref fetcher.Ref, spec imageSpec, tag string) ocispec.Descriptor {
	t.Helper()
	goos, arch, _ := strings.Cut(spec.platform, "/")
	img := ocispec.Image{Platform: ocispec.Platform{OS: goos, Architecture: arch}, RootFS: ocispec.RootFS{Type: "layers", DiffIDs: spec.diffIDs}}
	var layers []ocispec.Descriptor
	for _, l := range spec.layers {
		if spec.diffIDs == nil {
			img.RootFS.DiffIDs = append(img.RootFS.DiffIDs, digest.FromBytes(l.tar))
		}
		layers = append(layers, pushBytes(t, c, ref, l.mediaType, l.blob(t)))
	}
	cfgMT, manMT := ocispec.MediaTypeImageConfig, ocispec.MediaTypeImageManifest
	if spec.docker {
		cfgMT, manMT = fetcher.MediaTypeDockerConfig, fetcher.MediaTypeDockerManifest
	}
	cb, _ := json.Marshal(img)
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: manMT, Config: pushBytes(t, c, ref, cfgMT, cb), Layers: layers}
	mb, _ := json.Marshal(m)
	d, err := c.PushManifest(testContext(t), ref, manMT, mb, tag)
	if err != nil {
		t.Fatalf("push manifest: %v", err)
	}
	d.Platform = &img.Platform
	return d
}

func pushIndex(t *testing.T, c *fetcher.Client, ref fetcher.Ref, tag string, manifests ...ocispec.Descriptor) {
	t.Helper()
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: manifests}
	b, _ := json.Marshal(idx)
	if _, err := c.PushManifest(testContext(t), ref, ocispec.MediaTypeImageIndex, b, tag); err != nil {
		t.Fatalf("push index: %v", err)
	}
}

// fetchAll reads a whole blob.
func fetchAll(t *testing.T, c *fetcher.Client, ref fetcher.Ref, d ocispec.Descriptor) []byte {
	t.Helper()
	rc, err := c.FetchBlob(testContext(t), ref, d)
	if err != nil {
		t.Fatalf("fetch %s: %v", d.Digest, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("fetch %s: %v", d.Digest, err)
	}
	return b
}

// checkArtifact checks that res's artifact is in the registry, is found as
// the image's referrer, and that every layer's blob decompresses to the
// original tar and its TOC decodes and names the original layer.
func checkArtifact(t *testing.T, c *fetcher.Client, ref fetcher.Ref, res Result, tars map[digest.Digest][]byte) {
	t.Helper()
	m, desc, err := c.FindArtifact(testContext(t), ref, res.Subject)
	if err != nil {
		t.Fatalf("%s: FindArtifact: %v", res.Platform, err)
	}
	if desc.Digest != res.Artifact.Digest {
		t.Fatalf("%s: registry's artifact %s, Convert reported %s", res.Platform, desc.Digest, res.Artifact.Digest)
	}
	if len(m.Layers) != len(res.Layers) {
		t.Fatalf("%s: artifact has %d layers, result %d", res.Platform, len(m.Layers), len(res.Layers))
	}
	for i, l := range m.Layers {
		want, ok := tars[l.Original]
		if !ok {
			t.Fatalf("layer %d: original %s is not one of the image's layers", i, l.Original)
		}
		if l.DiffID != digest.FromBytes(want) {
			t.Errorf("layer %d: diffID %s, want %s", i, l.DiffID, digest.FromBytes(want))
		}
		blob := fetchAll(t, c, ref, ociDesc(l.Blob))
		zr, _ := zstd.NewReader(bytes.NewReader(blob))
		got, err := io.ReadAll(zr)
		zr.Close()
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("layer %d: streaming blob does not decompress to the original tar (err %v)", i, err)
		}
		toc, err := artifact.DecodeTOC(bytes.NewReader(fetchAll(t, c, ref, ociDesc(l.TOC))), artifact.Limits{})
		if err != nil {
			t.Fatalf("layer %d: TOC: %v", i, err)
		}
		if toc.Layer != l.Original || toc.DiffID != l.DiffID || toc.BlobSize != l.Blob.Size {
			t.Errorf("layer %d: TOC layer %s diffID %s blob size %d, want %s %s %d", i, toc.Layer, toc.DiffID, toc.BlobSize, l.Original, l.DiffID, l.Blob.Size)
		}
	}
}

// layers returns n distinct small layer tars stored with media types mts
// (cycled).
func makeLayers(t *testing.T, seed uint64, n int, mts ...string) []testLayer {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	var out []testLayer
	for i := range n {
		es := randomEntries(rng, "", 10, 3*testChunk)
		out = append(out, testLayer{tar: buildTar(t, tar.FormatPAX, es, 0), mediaType: mts[i%len(mts)]})
	}
	return out
}

func tarsOf(t *testing.T, layers ...[]testLayer) map[digest.Digest][]byte {
	t.Helper()
	m := map[digest.Digest][]byte{}
	for _, ls := range layers {
		for _, l := range ls {
			m[digest.FromBytes(l.blob(t))] = l.tar
		}
	}
	return m
}

// testOptions are Convert options for tests: small chunks, an isolated
// cache and temp dir.
func testOptions(t *testing.T) Options {
	t.Helper()
	return Options{Layer: LayerOptions{ChunkSize: testChunk}, CacheDir: t.TempDir(), TempDir: t.TempDir()}
}

func assertEmptyDir(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Errorf("temporary files left in %s: %v", dir, ents)
	}
}

func TestConvertImages(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c := newClient(t)
	const (
		ociTar  = ocispec.MediaTypeImageLayer
		ociGz   = ocispec.MediaTypeImageLayerGzip
		ociZstd = ocispec.MediaTypeImageLayerZstd
		dockGz  = mediaTypeDockerLayerGzip
	)
	cases := []struct {
		name      string
		images    []imageSpec // more than one: pushed as an index
		platform  string
		platforms []string // expected results
	}{
		{name: "oci gzip", images: []imageSpec{{platform: "linux/amd64", layers: makeLayers(t, 1, 3, ociGz)}}, platforms: []string{"linux/amd64"}},
		{name: "oci tar gzip zstd", images: []imageSpec{{platform: "linux/amd64", layers: makeLayers(t, 2, 3, ociTar, ociGz, ociZstd)}}, platforms: []string{"linux/amd64"}},
		{name: "docker schema2", images: []imageSpec{{platform: "linux/amd64", docker: true, layers: makeLayers(t, 3, 2, dockGz)}}, platforms: []string{"linux/amd64"}},
		{name: "index all platforms", images: []imageSpec{
			{platform: "linux/amd64", layers: makeLayers(t, 4, 2, ociGz)},
			{platform: "linux/arm64", layers: makeLayers(t, 5, 2, ociZstd)},
		}, platforms: []string{"linux/amd64", "linux/arm64"}},
		{name: "index one platform", images: []imageSpec{
			{platform: "linux/amd64", layers: makeLayers(t, 6, 1, ociGz)},
			{platform: "linux/arm64", layers: makeLayers(t, 7, 1, ociGz)},
		}, platform: "linux/arm64", platforms: []string{"linux/arm64"}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ref := mustRef(t, reg.Host+"/convert/case"+string(rune('a'+i))+":v1")
			var descs []ocispec.Descriptor
			var all [][]testLayer
			for _, im := range tc.images {
				tag := ref.Tag
				if len(tc.images) > 1 {
					tag = ""
				}
				descs = append(descs, pushImage(t, c, ref, im, tag))
				all = append(all, im.layers)
			}
			if len(descs) > 1 {
				pushIndex(t, c, ref, ref.Tag, descs...)
			}
			opts := testOptions(t)
			opts.Platform = tc.platform
			var started, done int
			opts.Progress = Progress{Start: func(LayerEvent) { started++ }, Done: func(LayerEvent, LayerReport) { done++ }}
			res, err := Convert(testContext(t), c, ref, opts)
			if err != nil {
				t.Fatalf("Convert: %v", err)
			}
			if len(res) != len(tc.platforms) {
				t.Fatalf("%d results, want %d", len(res), len(tc.platforms))
			}
			layers := 0
			for j, r := range res {
				if r.Platform != tc.platforms[j] || r.Existing {
					t.Errorf("result %d: platform %q existing %v, want %q new", j, r.Platform, r.Existing, tc.platforms[j])
				}
				checkArtifact(t, c, ref, r, tarsOf(t, all...))
				layers += len(r.Layers)
			}
			if started != layers || done != layers {
				t.Errorf("progress: %d started, %d done, want %d", started, done, layers)
			}
			assertEmptyDir(t, opts.TempDir)
		})
	}
}

// writes lists the requests of p that change the registry.
func writes(p *testenv.Proxy) []string {
	var out []string
	for _, s := range p.Paths() {
		if !strings.HasPrefix(s, "GET ") && !strings.HasPrefix(s, "HEAD ") {
			out = append(out, s)
		}
	}
	return out
}

func TestConvertIsIdempotent(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	proxy := testenv.CountingProxy(t, reg.Host)
	c := newClient(t)
	ref := mustRef(t, proxy.Host+"/idem/app:v1")
	layers := makeLayers(t, 10, 2, ocispec.MediaTypeImageLayerGzip)
	pushImage(t, c, ref, imageSpec{platform: "linux/amd64", layers: layers}, "v1")
	opts := testOptions(t)
	first, err := Convert(testContext(t), c, ref, opts)
	if err != nil {
		t.Fatalf("first Convert: %v", err)
	}
	if len(writes(proxy)) == 0 {
		t.Fatal("the proxy saw no writes from the first run: it does not count")
	}
	proxy.ResetCounters()
	opts.CacheDir = t.TempDir() // no help from the index either
	second, err := Convert(testContext(t), c, ref, opts)
	if err != nil {
		t.Fatalf("second Convert: %v", err)
	}
	if w := writes(proxy); len(w) != 0 {
		t.Errorf("second run wrote to the registry: %v", w)
	}
	if len(second) != 1 || !second[0].Existing || second[0].Artifact.Digest != first[0].Artifact.Digest {
		t.Fatalf("second run = %+v, want the existing artifact %s", second, first[0].Artifact.Digest)
	}
	if len(second[0].Layers) != 2 {
		t.Errorf("existing artifact reported with %d layers, want 2", len(second[0].Layers))
	}
}

func TestConvertReusesLayersAcrossRepositories(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	proxy := testenv.CountingProxy(t, reg.Host)
	c := newClient(t)
	shared := makeLayers(t, 20, 2, ocispec.MediaTypeImageLayerGzip)
	own := makeLayers(t, 21, 1, ocispec.MediaTypeImageLayerGzip)
	refA := mustRef(t, proxy.Host+"/team/a:v1")
	refB := mustRef(t, proxy.Host+"/team/b:v1")
	pushImage(t, c, refA, imageSpec{platform: "linux/amd64", layers: shared}, "v1")
	pushImage(t, c, refB, imageSpec{platform: "linux/amd64", layers: append(append([]testLayer{}, shared...), own...)}, "v1")

	opts := testOptions(t)
	if _, err := Convert(testContext(t), c, refA, opts); err != nil {
		t.Fatalf("Convert a: %v", err)
	}
	proxy.ResetCounters()
	var reused int
	opts.Progress.Reused = func(LayerEvent, LayerReport) { reused++ }
	res, err := Convert(testContext(t), c, refB, opts)
	if err != nil {
		t.Fatalf("Convert b: %v", err)
	}
	if reused != 2 {
		t.Errorf("%d layers reused, want 2", reused)
	}
	for i, l := range res[0].Layers {
		if want := i < 2; l.Reused != want {
			t.Errorf("layer %d: reused %v, want %v", i, l.Reused, want)
		}
	}
	// The shared layers were not downloaded again; the new one was.
	ownPath := "GET /v2/team/b/blobs/" + digest.FromBytes(own[0].blob(t)).String()
	if !strings.Contains(strings.Join(proxy.Paths(), "\n"), ownPath) {
		t.Errorf("proxy did not see %q: %v", ownPath, proxy.Paths())
	}
	for _, p := range proxy.Paths() {
		for _, l := range shared {
			d := digest.FromBytes(l.blob(t)).String()
			if strings.HasPrefix(p, "GET ") && strings.HasSuffix(p, d) {
				t.Errorf("shared layer fetched again: %s", p)
			}
		}
	}
	checkArtifact(t, c, refB, res[0], tarsOf(t, shared, own))
}

func TestConvertFailures(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c := newClient(t)
	good := makeLayers(t, 30, 2, ocispec.MediaTypeImageLayerGzip)

	corruptRef := mustRef(t, reg.Host+"/fail/corrupt:v1")
	pushImage(t, c, corruptRef, imageSpec{platform: "linux/amd64", layers: good}, "v1")
	corruptBlob(t, reg, digest.FromBytes(good[1].blob(t)))

	diffRef := mustRef(t, reg.Host+"/fail/diffid:v1")
	pushImage(t, c, diffRef, imageSpec{platform: "linux/amd64", layers: good[:1], diffIDs: []digest.Digest{digest.FromString("other")}}, "v1")

	const foreign = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
	foreignRef := mustRef(t, reg.Host+"/fail/foreign:v1")
	pushImage(t, c, foreignRef, imageSpec{platform: "linux/amd64", layers: []testLayer{good[0], {tar: good[1].tar, mediaType: foreign}}}, "v1")

	badTar := testLayer{tar: bytes.Repeat([]byte("not a tar! "), 200), mediaType: ocispec.MediaTypeImageLayerGzip}
	badTarRef := mustRef(t, reg.Host+"/fail/badtar:v1")
	pushImage(t, c, badTarRef, imageSpec{platform: "linux/amd64", layers: []testLayer{badTar}}, "v1")

	cases := []struct {
		name    string
		ref     fetcher.Ref
		opts    func(*Options)
		wantErr error
		mention string
	}{
		{"corrupted layer blob", corruptRef, nil, artifact.ErrDigestMismatch, digest.FromBytes(good[1].blob(t)).String()},
		{"diffID mismatch", diffRef, nil, ErrCorruptLayer, digest.FromString("other").String()},
		{"unsupported media type", foreignRef, nil, ErrUnsupportedMediaType, foreign},
		{"malformed tar", badTarRef, nil, ErrBadTar, digest.FromBytes(badTar.blob(t)).String()},
		{"missing tag", mustRef(t, reg.Host+"/fail/corrupt:nope"), nil, fetcher.ErrNotFound, "nope"},
		{"missing platform", corruptRef, func(o *Options) { o.Platform = "linux/s390x" }, fetcher.ErrNotFound, "s390x"},
		{"bad chunk size", corruptRef, func(o *Options) { o.Layer.ChunkSize = 10 }, nil, "chunk size"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			opts := testOptions(t)
			if tc.opts != nil {
				tc.opts(&opts)
			}
			_, err := Convert(testContext(t), c, tc.ref, opts)
			if err == nil || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) || !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("Convert error = %v, want %v mentioning %q", err, tc.wantErr, tc.mention)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			assertEmptyDir(t, opts.TempDir)
			if tc.wantErr == fetcher.ErrNotFound || tc.opts != nil {
				return
			}
			desc, rerr := c.Resolve(testContext(t), tc.ref)
			if rerr != nil {
				t.Fatal(rerr)
			}
			if _, _, ferr := c.FindArtifact(testContext(t), tc.ref, desc); !errors.Is(ferr, fetcher.ErrNoArtifact) {
				t.Errorf("after a failed conversion FindArtifact = %v, want ErrNoArtifact", ferr)
			}
		})
	}
}

// corruptBlob flips a byte of a blob in the registry's storage.
func corruptBlob(t *testing.T, reg *testenv.Reg, d digest.Digest) {
	t.Helper()
	p := filepath.Join(reg.Dir, "docker/registry/v2/blobs/sha256", d.Encoded()[:2], d.Encoded(), "data")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("corrupt blob: %v", err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestConvertCanceled(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c := newClient(t)
	ref := mustRef(t, reg.Host+"/cancel/app:v1")
	pushImage(t, c, ref, imageSpec{platform: "linux/amd64", layers: makeLayers(t, 40, 2, ocispec.MediaTypeImageLayerGzip)}, "v1")
	ctx, cancel := context.WithCancel(testContext(t))
	opts := testOptions(t)
	opts.Progress.Start = func(LayerEvent) { cancel() }
	_, err := Convert(ctx, c, ref, opts)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Convert = %v, want context.Canceled", err)
	}
	assertEmptyDir(t, opts.TempDir)
}
