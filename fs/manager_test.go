package fs_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/cache"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/fs"
	"github.com/streamer-dev/streamer/internal/testenv"
)

// streamedImage is an image pushed with its streaming artifact.
type streamedImage struct {
	ref      string // through the proxy
	manifest digest.Digest
	layer    digest.Digest
	tar      []byte
	// chain and parent are the chain ids of the image's layers up to this
	// one and up to the one below ("" for the base layer).
	chain, parent digest.Digest
}

// pushStreamedImage pushes a one-layer image made of tarBytes and, if
// withArtifact, its streaming artifact, to reg.
func pushStreamedImage(t *testing.T, c *fetcher.Client, host, repo string, tarBytes []byte, withArtifact bool) streamedImage {
	t.Helper()
	return pushStreamedImageTOC(t, c, host, repo, tarBytes, withArtifact, nil)
}

// pushStreamedImageTOC is pushStreamedImage with a hook that may alter the
// layer's TOC before it is pushed.
func pushStreamedImageTOC(t *testing.T, c *fetcher.Client, host, repo string, tarBytes []byte, withArtifact bool, alter func(*artifact.TOC)) streamedImage {
	t.Helper()
	if !withArtifact {
		return pushCrafted(t, c, host, repo, tarBytes, nil, nil)
	}
	var craft func(l *testLayer, layer digest.Digest) []byte
	if alter != nil {
		craft = func(l *testLayer, layer digest.Digest) []byte {
			alter(l.toc)
			return marshalTOC(t, l.toc)
		}
	}
	return pushCrafted(t, c, host, repo, tarBytes, tarBytes, craft)
}

// pushCrafted pushes a one-layer image made of imageTar and, unless artTar
// is nil, a streaming artifact for it whose blob is converted from artTar
// and whose TOC blob is what craft returns (nil craft: the honest TOC).
// With artTar other than imageTar it is how an attacker with push rights
// to the repository, but not to the image, would attack.
func pushCrafted(t *testing.T, c *fetcher.Client, host, repo string, imageTar, artTar []byte, craft func(l *testLayer, layer digest.Digest) []byte) streamedImage {
	t.Helper()
	return pushLayers(t, c, host, repo, []craftedLayer{{imageTar, artTar, craft}})[0]
}

// craftedLayer is one layer for pushLayers: see pushCrafted.
type craftedLayer struct {
	imageTar, artTar []byte
	craft            func(l *testLayer, layer digest.Digest) []byte
}

// pushLayers pushes an image of the given layers, bottom first, and a
// streaming artifact for those with an artTar (none when no layer has
// one); it returns each layer's view of the image.
func pushLayers(t *testing.T, c *fetcher.Client, host, repo string, layers []craftedLayer) []streamedImage {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ref, err := fetcher.ParseRef(host + "/" + repo + ":v1")
	if err != nil {
		t.Fatal(err)
	}
	push := func(mt string, b []byte) ocispec.Descriptor {
		d := ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(b), Size: int64(len(b))}
		if err := c.PushBlob(ctx, ref, d, bytes.NewReader(b)); err != nil {
			t.Fatalf("push blob: %v", err)
		}
		return d
	}
	var descs []ocispec.Descriptor
	var diffIDs []digest.Digest
	for _, l := range layers {
		d := push(ocispec.MediaTypeImageLayer, l.imageTar)
		descs = append(descs, d)
		diffIDs = append(diffIDs, d.Digest)
	}
	cfg, _ := json.Marshal(ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	})
	cfgDesc := push(ocispec.MediaTypeImageConfig, cfg)
	mb, _ := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    cfgDesc,
		Layers:    descs,
	})
	subject, err := c.PushManifest(ctx, ref, ocispec.MediaTypeImageManifest, mb, "v1")
	if err != nil {
		t.Fatalf("push manifest: %v", err)
	}
	imgs := make([]streamedImage, len(layers))
	var streamed []artifact.Layer
	var parent digest.Digest
	for i, cl := range layers {
		layerDigest := descs[i].Digest
		chain := layerDigest // uncompressed layers: the diffID is the digest
		if parent != "" {
			chain = digest.FromString(parent.String() + " " + layerDigest.String())
		}
		imgs[i] = streamedImage{ref: ref.String(), manifest: subject.Digest, layer: layerDigest, tar: cl.imageTar, chain: chain, parent: parent}
		parent = chain
		if cl.artTar == nil {
			continue
		}
		l := buildLayer(t, cl.artTar, artifact.MinChunkSize)
		l.toc.Layer = layerDigest
		var tb []byte
		if cl.craft != nil {
			tb = cl.craft(l, layerDigest)
		} else if tb, _, err = l.toc.Marshal(); err != nil {
			t.Fatal(err)
		}
		blobDesc := push(artifact.MediaTypeStreamingLayer, l.blob)
		tocDesc := push(artifact.MediaTypeTOC, tb)
		streamed = append(streamed, artifact.Layer{
			Original: layerDigest,
			DiffID:   layerDigest,
			Blob:     artifact.Descriptor{MediaType: artifact.MediaTypeStreamingLayer, Digest: blobDesc.Digest, Size: blobDesc.Size},
			TOC:      artifact.Descriptor{MediaType: artifact.MediaTypeTOC, Digest: tocDesc.Digest, Size: tocDesc.Size},
		})
	}
	if len(streamed) == 0 {
		return imgs
	}
	push(artifact.MediaTypeConfig, artifact.EmptyConfigBytes)
	am, err := artifact.BuildManifest(subject, streamed, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ad, err := c.PushManifest(ctx, ref, ocispec.MediaTypeImageManifest, am, "")
	if err != nil {
		t.Fatalf("push artifact: %v", err)
	}
	if err := c.AddReferrer(ctx, ref, subject, ad); err != nil {
		t.Fatalf("add referrer: %v", err)
	}
	return imgs
}

func (img streamedImage) labels() map[string]string {
	return map[string]string{
		fs.LabelImageRef:       img.ref,
		fs.LabelManifestDigest: img.manifest.String(),
		fs.LabelLayerDigest:    img.layer.String(),
		fs.LabelSnapshotRef:    img.chain.String(),
		fs.LabelParent:         img.parent.String(),
	}
}

type managerEnv struct {
	reg    *testenv.Reg
	proxy  *testenv.Proxy
	client *fetcher.Client
	cache  *cache.Store
	root   string
}

func newManagerEnv(t *testing.T) *managerEnv {
	t.Helper()
	requireFUSE(t)
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	proxy := testenv.CountingProxy(t, reg.Host)
	client, err := fetcher.New(fetcher.Options{Retries: -1, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	return &managerEnv{reg: reg, proxy: proxy, client: client, root: root}
}

// manager opens the cache and a Manager on the env's root, as a daemon
// (re)start does.
func (e *managerEnv) manager(t *testing.T) *fs.Manager {
	t.Helper()
	st, err := cache.Open(cache.Options{Dir: filepath.Join(e.root, "cache"), MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	e.cache = st
	m, err := fs.NewManager(fs.ManagerOptions{
		Root:        filepath.Join(e.root, "layers"),
		Registry:    e.client,
		Cache:       st,
		ReadTimeout: 3 * time.Second,
		Logger:      quietLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("close manager: %v", err)
		}
		st.Close()
	})
	return m
}

func managerMount(t *testing.T, m *fs.Manager, labels map[string]string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Mount(ctx, dir, labels); err != nil {
		t.Fatalf("mount: %v", err)
	}
	t.Cleanup(func() { m.Unmount(context.Background(), dir) })
	return dir
}

func readWithin(t *testing.T, p string, d time.Duration) ([]byte, error) {
	t.Helper()
	type res struct {
		b   []byte
		err error
	}
	r := withTimeout(t, d, "read "+p, func() res {
		b, err := os.ReadFile(p)
		return res{b, err}
	})
	return r.b, r.err
}

func TestManagerStreamsVerifiesAndRestores(t *testing.T) {
	e := newManagerEnv(t)
	small := []byte("hello from a streamed layer\n")
	big := randomBytes(11, 4<<20)
	tampered := randomBytes(12, 300<<10)
	unreachable := randomBytes(13, 300<<10)
	tarBytes := makeTar(t, []tarEntry{
		dir("app/", 0o755, 1),
		reg("app/small.txt", 0o644, small, 2),
		reg("app/big.bin", 0o644, big, 2),
		reg("app/tampered.bin", 0o644, tampered, 2),
		reg("app/unreachable.bin", 0o644, unreachable, 2),
	})
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/app", tarBytes, true)
	m := e.manager(t)

	e.proxy.ResetCounters()
	dir := managerMount(t, m, img.labels())
	tocBytes := e.proxy.BlobBytes()
	if tocBytes == 0 || tocBytes > 64<<10 {
		t.Fatalf("mounting read %d blob bytes; want the TOC alone", tocBytes)
	}

	got, err := readWithin(t, filepath.Join(dir, "app/small.txt"), 10*time.Second)
	if err != nil || !bytes.Equal(got, small) {
		t.Fatalf("read small.txt = %q, %v; want %q", got, err, small)
	}
	if n := e.proxy.BlobBytes() - tocBytes; n > 256<<10 {
		t.Errorf("reading a small file fetched %d bytes; want one chunk", n)
	}
	got, err = readWithin(t, filepath.Join(dir, "app/big.bin"), 20*time.Second)
	if err != nil || !bytes.Equal(got, big) {
		t.Fatalf("read big.bin: %v (equal %v)", err, bytes.Equal(got, big))
	}
	usage, _, err := m.Usage(context.Background(), dir)
	if err != nil || usage < int64(len(big)) {
		t.Errorf("usage = %d, %v; want at least %d", usage, err, len(big))
	}

	// Altered bytes from the registry: EIO, and nothing cached.
	e.proxy.SetTamper(func(path string, body []byte) []byte {
		out := bytes.Clone(body)
		for i := range out {
			out[i] ^= 0xff
		}
		return out
	})
	if _, err := readWithin(t, filepath.Join(dir, "app/tampered.bin"), 10*time.Second); !errors.Is(err, syscall.EIO) {
		t.Errorf("read of tampered chunks: err = %v; want EIO", err)
	}
	e.proxy.SetTamper(nil)
	toc := tocOf(t, e, img.layer)
	for _, c := range chunksOf(toc, "app/tampered.bin") {
		if e.cache.Has(c.Digest) {
			t.Errorf("chunk %s of a tampered read is in the cache", c.Digest)
		}
	}
	if s := m.Stats(); s.BadChunks == 0 {
		t.Errorf("stats: bad chunks = 0 after a tampered read")
	}

	// Registry down: EIO within the read timeout; cached data still reads.
	e.proxy.SetDown(true)
	start := time.Now()
	if _, err := readWithin(t, filepath.Join(dir, "app/unreachable.bin"), 20*time.Second); !errors.Is(err, syscall.EIO) {
		t.Errorf("read with registry down: err = %v; want EIO", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("read with registry down took %v; read timeout is 3s", d)
	}

	// Restart with the registry unreachable: the layer mounts again from
	// its local record and serves every cached byte.
	if err := m.Unmount(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	m.Close()
	e.cache.Close()
	m2 := e.manager(t)
	before := e.proxy.Requests()
	dir2 := managerMount(t, m2, img.labels())
	got, err = readWithin(t, filepath.Join(dir2, "app/big.bin"), 20*time.Second)
	if err != nil || !bytes.Equal(got, big) {
		t.Fatalf("read cached big.bin after restart with registry down: %v", err)
	}
	if n := e.proxy.Requests() - before; n != 0 {
		t.Errorf("restart made %d registry requests; want none", n)
	}
	e.proxy.SetDown(false)
	got, err = readWithin(t, filepath.Join(dir2, "app/unreachable.bin"), 20*time.Second)
	if err != nil || !bytes.Equal(got, unreachable) {
		t.Errorf("read once the registry is back: %v", err)
	}
}

func TestManagerFallsBackWithoutArtifact(t *testing.T) {
	e := newManagerEnv(t)
	tarBytes := makeTar(t, []tarEntry{reg("a.txt", 0o644, []byte("a"), 1)})
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/plain", tarBytes, false)
	m := e.manager(t)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := m.Mount(ctx, dir, img.labels())
	if !errors.Is(err, fs.ErrNotStreamable) {
		t.Fatalf("mount of an image without artifact: %v; want ErrNotStreamable", err)
	}
	if err := m.Mount(ctx, dir, map[string]string{}); !errors.Is(err, fs.ErrNotStreamable) {
		t.Fatalf("mount without labels: %v; want ErrNotStreamable", err)
	}
	// The negative answer is remembered: no second lookup.
	before := e.proxy.Requests()
	if err := m.Mount(ctx, dir, img.labels()); !errors.Is(err, fs.ErrNotStreamable) {
		t.Fatal(err)
	}
	if n := e.proxy.Requests() - before; n != 0 {
		t.Errorf("second lookup made %d requests; want 0 (cached)", n)
	}
	if s := m.Stats(); s.Fallbacks != 3 || s.MountsTotal != 0 {
		t.Errorf("stats = %+v; want 3 fallbacks, 0 mounts", s)
	}
	ds := m.Decisions()
	if len(ds) != 1 || ds[0].Image != img.ref || ds[0].PulledLayers != 2 || ds[0].StreamedLayers != 0 ||
		!strings.Contains(ds[0].Reason, "pulled normally") || !strings.Contains(ds[0].Reason, "no streaming artifact") {
		t.Errorf("decisions = %+v; want image %s pulled twice, with the reason", ds, img.ref)
	}
}

func tocOf(t *testing.T, e *managerEnv, layer digest.Digest) *artifact.TOC {
	t.Helper()
	var rec struct {
		TOC artifact.Descriptor `json:"toc"`
	}
	b, err := os.ReadFile(filepath.Join(e.root, "layers", "layers", layer.Encoded()+".json"))
	if err != nil {
		t.Fatal(err)
	}
	json.Unmarshal(b, &rec)
	f, err := os.Open(filepath.Join(e.root, "layers", "tocs", rec.TOC.Digest.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	toc, err := artifact.DecodeTOC(f, artifact.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	return toc
}

func chunksOf(toc *artifact.TOC, name string) []artifact.Chunk {
	for _, en := range toc.Entries {
		if en.Name == name {
			first, last := toc.ChunkRange(en.Offset, en.Size)
			return toc.Chunks[first:last]
		}
	}
	return nil
}

// TestManagerPinsMountedLayers: the chunks of a mounted layer stay cached
// even past the cache's bound, and become evictable once it is unmounted.
func TestManagerPinsMountedLayers(t *testing.T) {
	e := newManagerEnv(t)
	data := randomBytes(21, 2<<20)
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/pinned", makeTar(t, []tarEntry{reg("data.bin", 0o644, data, 1)}), true)
	const bound = 256 << 10
	st, err := cache.Open(cache.Options{Dir: filepath.Join(e.root, "small-cache"), MaxBytes: bound, MemoryBytes: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	m, err := fs.NewManager(fs.ManagerOptions{Root: filepath.Join(e.root, "layers"), Registry: e.client, Cache: st, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	dir := managerMount(t, m, img.labels())
	if got, err := readWithin(t, filepath.Join(dir, "data.bin"), 20*time.Second); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read data.bin: %v", err)
	}
	if st.Size() < int64(len(data)) {
		t.Errorf("cache holds %d bytes of a mounted %d-byte file; its chunks were evicted", st.Size(), len(data))
	}
	if err := m.Unmount(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	if st.Size() > bound {
		t.Errorf("cache holds %d bytes after unmount, over its %d bound", st.Size(), bound)
	}
}

// TestManagerForgetsRemovedLayers: once a layer's snapshot is removed, its
// chunks, TOC and record leave the node, except chunks a mounted layer shares.
func TestManagerForgetsRemovedLayers(t *testing.T) {
	e := newManagerEnv(t)
	shared := randomBytes(31, 200<<10)
	own := randomBytes(32, 300<<10)
	imgA := pushStreamedImage(t, e.client, e.proxy.Host, "test/gc-a", makeTar(t, []tarEntry{reg("shared.bin", 0o644, shared, 1), reg("own.bin", 0o644, own, 1)}), true)
	imgB := pushStreamedImage(t, e.client, e.proxy.Host, "test/gc-b", makeTar(t, []tarEntry{reg("shared.bin", 0o644, shared, 2)}), true)
	m := e.manager(t)
	dirA := managerMount(t, m, imgA.labels())
	dirB := managerMount(t, m, imgB.labels())
	for _, p := range []string{filepath.Join(dirA, "shared.bin"), filepath.Join(dirA, "own.bin"), filepath.Join(dirB, "shared.bin")} {
		if _, err := readWithin(t, p, 20*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	tocA := tocOf(t, e, imgA.layer)
	ctx := context.Background()
	// Still mounted: Forget keeps everything.
	if err := m.Forget(ctx, imgA.labels()); err != nil {
		t.Fatal(err)
	}
	if !e.cache.Has(chunksOf(tocA, "own.bin")[0].Digest) {
		t.Fatal("Forget of a mounted layer removed its chunks")
	}
	if err := m.Unmount(ctx, dirA); err != nil {
		t.Fatal(err)
	}
	if err := m.Forget(ctx, imgA.labels()); err != nil {
		t.Fatal(err)
	}
	for _, c := range chunksOf(tocA, "own.bin") {
		if e.cache.Has(c.Digest) {
			t.Errorf("chunk %s of a forgotten layer is still cached", c.Digest)
		}
	}
	for _, c := range chunksOf(tocA, "shared.bin") {
		if !e.cache.Has(c.Digest) {
			t.Errorf("chunk %s shared with a mounted layer was removed", c.Digest)
		}
	}
	if _, err := os.Stat(filepath.Join(e.root, "layers", "layers", imgA.layer.Encoded()+".json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record of a forgotten layer: %v, want it gone", err)
	}
}

// TestManagerBindsTOCToImage: a TOC whose diffID does not give the chain id
// containerd asks for belongs to another image; the layer is pulled normally.
func TestManagerBindsTOCToImage(t *testing.T) {
	e := newManagerEnv(t)
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/bound", makeTar(t, []tarEntry{reg("a", 0o644, []byte("a"), 1)}), true)
	m := e.manager(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for name, labels := range map[string]map[string]string{
		"other chain id": {fs.LabelSnapshotRef: digest.FromString("another image").String()},
		"other parent":   {fs.LabelParent: digest.FromString("another parent").String()},
	} {
		l := img.labels()
		for k, v := range labels {
			l[k] = v
		}
		if err := m.Mount(ctx, t.TempDir(), l); !errors.Is(err, fs.ErrNotStreamable) {
			t.Errorf("%s: mount = %v; want ErrNotStreamable", name, err)
		}
	}
	// The right chain id mounts (labels() carries it).
	managerMount(t, m, img.labels())
	ds := m.Decisions()
	if len(ds) != 1 || ds[0].StreamedLayers != 1 || ds[0].PulledLayers != 2 || !strings.HasPrefix(ds[0].Reason, "streaming artifact sha256:") {
		t.Errorf("decisions = %+v; want 2 refused then 1 streamed, naming the artifact", ds)
	}
}
