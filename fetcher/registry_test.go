package fetcher

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/internal/testenv"
)

func TestParseRef(t *testing.T) {
	d := digest.FromString("x")
	for _, tc := range []struct {
		in   string
		want Ref
		str  string
	}{
		{"127.0.0.1:5000/app:v1", Ref{Host: "127.0.0.1:5000", Repository: "app", Tag: "v1"}, "127.0.0.1:5000/app:v1"},
		{"localhost:5000/team/app", Ref{Host: "localhost:5000", Repository: "team/app", Tag: "latest"}, "localhost:5000/team/app:latest"},
		{"reg.example/app@" + d.String(), Ref{Host: "reg.example", Repository: "app", Digest: d}, "reg.example/app@" + d.String()},
		{"reg.example/app:v2@" + d.String(), Ref{Host: "reg.example", Repository: "app", Tag: "v2", Digest: d}, "reg.example/app:v2@" + d.String()},
		{"busybox", Ref{Host: "docker.io", Repository: "library/busybox", Tag: "latest"}, "docker.io/library/busybox:latest"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseRef(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want || got.String() != tc.str {
				t.Fatalf("ParseRef(%q) = %+v (%s), want %+v (%s)", tc.in, got, got, tc.want, tc.str)
			}
			if got.Name() != tc.want.Host+"/"+tc.want.Repository {
				t.Fatalf("Name() = %s", got.Name())
			}
		})
	}
	for _, bad := range []string{"", "reg.example/UPPER", "reg.example/app:bad tag", "reg.example/app@sha256:zz"} {
		if _, err := ParseRef(bad); err == nil {
			t.Errorf("ParseRef(%q) succeeded", bad)
		}
	}
}

func TestResolveAndImageManifests(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c := newClient(t, Options{})
	ctx := testCtx(t)
	ref := mustRef(t, reg.Host+"/multi:latest")

	oci := pushImage(t, c, ref, "linux/amd64", false, "oci", 100)
	dock := pushImage(t, c, ref, "linux/arm64", true, "docker", 100)
	armv7 := pushImage(t, c, ref, "linux/arm/v7", false, "", 100)
	att := pushImage(t, c, ref, "linux/amd64", false, "", 10)
	att.Desc.Platform = &ocispec.Platform{OS: "unknown", Architecture: "unknown"}
	att.Desc.Annotations = map[string]string{"vnd.docker.reference.type": "attestation-manifest"}
	idx := pushIndex(t, c, ref, false, "index", oci.Desc, dock.Desc, armv7.Desc, att.Desc)
	list := pushIndex(t, c, ref, true, "list", dock.Desc, oci.Desc)

	t.Run("resolve", func(t *testing.T) {
		for _, tc := range []struct {
			ref  Ref
			want ocispec.Descriptor
		}{
			{Ref{Host: reg.Host, Repository: "multi", Tag: "oci"}, oci.Desc},
			{Ref{Host: reg.Host, Repository: "multi", Tag: "docker"}, dock.Desc},
			{Ref{Host: reg.Host, Repository: "multi", Digest: armv7.Desc.Digest}, armv7.Desc},
			{Ref{Host: reg.Host, Repository: "multi", Tag: "index"}, idx},
			{Ref{Host: reg.Host, Repository: "multi", Tag: "list"}, list},
		} {
			got, err := c.Resolve(ctx, tc.ref)
			if err != nil {
				t.Fatalf("Resolve %s: %v", tc.ref, err)
			}
			if got.Digest != tc.want.Digest || got.MediaType != tc.want.MediaType || got.Size != tc.want.Size {
				t.Fatalf("Resolve %s = %+v, want %+v", tc.ref, got, tc.want)
			}
			b, err := c.FetchManifest(ctx, tc.ref, got)
			if err != nil || digest.FromBytes(b) != tc.want.Digest {
				t.Fatalf("FetchManifest %s: %v", tc.ref, err)
			}
		}
	})
	t.Run("not found", func(t *testing.T) {
		for _, r := range []Ref{
			{Host: reg.Host, Repository: "multi", Tag: "nope"},
			{Host: reg.Host, Repository: "absent", Tag: "latest"},
			{Host: reg.Host, Repository: "multi", Digest: digest.FromString("absent")},
		} {
			if _, err := c.Resolve(ctx, r); !errors.Is(err, ErrNotFound) {
				t.Errorf("Resolve %s: %v, want ErrNotFound", r, err)
			}
		}
	})
	t.Run("manifest digest mismatch", func(t *testing.T) {
		d := oci.Desc
		d.Digest = dock.Desc.Digest // fetch one manifest, expect another's size
		if _, err := c.FetchManifest(ctx, ref, d); !errors.Is(err, artifact.ErrDigestMismatch) {
			t.Fatalf("FetchManifest with wrong size: %v, want ErrDigestMismatch", err)
		}
	})

	for _, tc := range []struct {
		name, tag, platform string
		want                []ocispec.Descriptor
		wantErr             error
	}{
		{"index all", "index", "", []ocispec.Descriptor{oci.Desc, dock.Desc, armv7.Desc}, nil},
		{"index arm64", "index", "linux/arm64", []ocispec.Descriptor{dock.Desc}, nil},
		{"index arm/v7", "index", "linux/arm/v7", []ocispec.Descriptor{armv7.Desc}, nil},
		{"index amd64", "index", "linux/amd64", []ocispec.Descriptor{oci.Desc}, nil},
		{"index absent platform", "index", "linux/s390x", nil, ErrNotFound},
		{"docker list", "list", "", []ocispec.Descriptor{dock.Desc, oci.Desc}, nil},
		{"single OCI platform from config", "oci", "", []ocispec.Descriptor{oci.Desc}, nil},
		{"single Docker platform from config", "docker", "linux/arm64", []ocispec.Descriptor{dock.Desc}, nil},
		{"single wrong platform", "oci", "linux/arm64", nil, ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := c.ImageManifests(ctx, Ref{Host: reg.Host, Repository: "multi", Tag: tc.tag}, tc.platform)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %d manifests, want %d", len(got), len(tc.want))
			}
			for i, w := range tc.want {
				g := got[i]
				if g.Descriptor.Digest != w.Digest || PlatformString(g.Platform) != PlatformString(w.Platform) {
					t.Errorf("manifest %d = %s %s, want %s %s", i, g.Descriptor.Digest, PlatformString(g.Platform), w.Digest, PlatformString(w.Platform))
				}
				if len(g.Manifest.Layers) != 1 {
					t.Errorf("manifest %d has %d layers", i, len(g.Manifest.Layers))
				}
			}
		})
	}
}

func TestBlobs(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	proxy := testenv.CountingProxy(t, reg.Host)
	c := newClient(t, Options{})
	ctx := testCtx(t)
	ref := mustRef(t, proxy.Host+"/blobs:latest")
	data := randomBytes(t, 3<<20+17)
	desc := pushBlob(t, c, ref, "application/octet-stream", data)

	t.Run("fetch verified", func(t *testing.T) {
		rc, err := c.FetchBlob(ctx, ref, desc)
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		got, err := io.ReadAll(rc)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("FetchBlob: %v (equal=%v)", err, bytes.Equal(got, data))
		}
	})
	for _, tc := range []struct {
		name   string
		tamper func(string, []byte) []byte
	}{
		{"flipped byte", func(_ string, b []byte) []byte { b[len(b)/2] ^= 1; return b }},
		{"truncated", func(_ string, b []byte) []byte { return b[:len(b)-1] }},
		{"extended", func(_ string, b []byte) []byte { return append(b, 0) }},
	} {
		t.Run("tampered "+tc.name, func(t *testing.T) {
			proxy.SetTamper(tc.tamper)
			defer proxy.SetTamper(nil)
			rc, err := c.FetchBlob(ctx, ref, desc)
			if err == nil {
				_, err = io.ReadAll(rc)
				rc.Close()
			}
			if !errors.Is(err, artifact.ErrDigestMismatch) {
				t.Fatalf("tampered blob: %v, want ErrDigestMismatch", err)
			}
		})
	}
	t.Run("missing", func(t *testing.T) {
		_, err := c.FetchBlob(ctx, ref, ocispec.Descriptor{Digest: digest.FromString("nope"), Size: 4})
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("FetchBlob missing: %v, want ErrNotFound", err)
		}
	})

	size := int64(len(data))
	// A proxy of its own: the tamper cases above leave body copies running.
	rp := testenv.CountingProxy(t, reg.Host)
	rref := Ref{Host: rp.Host, Repository: ref.Repository}
	direct := Ref{Host: reg.Host, Repository: ref.Repository}
	for _, tc := range []struct {
		name   string
		off, n int64
		err    error
	}{
		{"first byte", 0, 1, nil},
		{"last byte", size - 1, 1, nil},
		{"middle", 1<<20 + 3, 65536, nil},
		{"whole", 0, size, nil},
		{"empty", 10, 0, nil},
		{"past end", size - 1, 2, ErrRangeMismatch},
		{"beyond", size + 10, 1, ErrRangeMismatch},
	} {
		t.Run("range "+tc.name, func(t *testing.T) {
			rp.ResetCounters()
			if tc.err != nil {
				// Directly: distribution 2.8 sends a 416 whose body is longer
				// than its Content-Length, which breaks the proxy.
				_, err := c.ReadRange(ctx, direct, desc.Digest, tc.off, tc.n)
				if !errors.Is(err, tc.err) {
					t.Fatalf("ReadRange: %v, want %v", err, tc.err)
				}
				return
			}
			got, err := c.ReadRange(ctx, rref, desc.Digest, tc.off, tc.n)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data[tc.off:tc.off+tc.n]) {
				t.Fatal("wrong bytes")
			}
			if rp.BlobBytes() != tc.n {
				t.Fatalf("%d blob bytes crossed the wire for %d asked", rp.BlobBytes(), tc.n)
			}
		})
	}
	// A background reader reads into a buffer of its own, reused, and
	// gives way between steps of the body.
	t.Run("range into a reused buffer, paced", func(t *testing.T) {
		buf := make([]byte, 4*PaceStep+100)
		for _, off := range []int64{1<<20 + 3, 17} {
			paces := 0
			if err := c.ReadRangeInto(ctx, rref, desc.Digest, off, buf, func() { paces++ }); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, data[off:off+int64(len(buf))]) {
				t.Fatalf("ReadRangeInto at %d: wrong bytes", off)
			}
			if paces != 4 {
				t.Fatalf("ReadRangeInto of %d bytes: paced %d times, want 4 (between 5 steps)", len(buf), paces)
			}
		}
	})

	t.Run("push exists mount", func(t *testing.T) {
		other := Ref{Host: ref.Host, Repository: "other", Tag: "latest"}
		if ok, err := c.BlobExists(ctx, other, desc); err != nil || ok {
			t.Fatalf("BlobExists before mount = %v, %v", ok, err)
		}
		if err := c.MountBlob(ctx, other, ref, desc); err != nil {
			t.Fatalf("MountBlob: %v", err)
		}
		if ok, err := c.BlobExists(ctx, other, desc); err != nil || !ok {
			t.Fatalf("BlobExists after mount = %v, %v", ok, err)
		}
		absent := ocispec.Descriptor{MediaType: "application/octet-stream", Digest: digest.FromString("absent"), Size: 6}
		if err := c.MountBlob(ctx, other, ref, absent); !errors.Is(err, ErrNotMounted) {
			t.Fatalf("MountBlob of absent blob: %v, want ErrNotMounted", err)
		}
		if err := c.MountBlob(ctx, other, Ref{Host: "elsewhere:5000", Repository: "x"}, desc); !errors.Is(err, ErrNotMounted) {
			t.Fatalf("MountBlob across registries: %v, want ErrNotMounted", err)
		}
		bad := ocispec.Descriptor{MediaType: "application/octet-stream", Digest: digest.FromString("other"), Size: 5}
		if err := c.PushBlob(ctx, other, bad, bytes.NewReader([]byte("hello"))); err == nil {
			t.Fatal("PushBlob with wrong digest succeeded")
		}
	})
}

func TestRegistryDown(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c := newClient(t, Options{})
	ctx := testCtx(t)
	ref := mustRef(t, reg.Host+"/down:v1")
	img := pushImage(t, c, ref, "linux/amd64", false, "v1", 1000)
	reg.Stop()
	if _, err := c.Resolve(ctx, ref); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("Resolve with registry down: %v, want ErrUnreachable", err)
	}
	if _, err := c.ReadRange(ctx, ref, img.Layer.Digest, 0, 10); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("ReadRange with registry down: %v, want ErrUnreachable", err)
	}
	reg.Start()
	got, err := c.ReadRange(ctx, ref, img.Layer.Digest, 10, 10)
	if err != nil || !bytes.Equal(got, img.Layers[0][10:20]) {
		t.Fatalf("ReadRange after restart: %v", err)
	}
}

func TestMirrors(t *testing.T) {
	origin := testenv.Registry(t, testenv.RegistryOptions{})
	mirrorReg := testenv.Registry(t, testenv.RegistryOptions{})
	mirror := testenv.CountingProxy(t, mirrorReg.Host)
	ctx := testCtx(t)
	plain := newClient(t, Options{})
	// The same image content in both registries.
	img := pushImage(t, plain, mustRef(t, origin.Host+"/app:v1"), "linux/amd64", false, "v1", 4096)
	for _, l := range [][]byte{img.Layers[0]} {
		pushBlob(t, plain, mustRef(t, mirror.Host+"/app"), "application/octet-stream", l)
	}
	c := newClient(t, Options{Mirrors: map[string][]string{origin.Host: {mirror.Host}}})
	ref := mustRef(t, origin.Host+"/app:v1")

	got, err := c.ReadRange(ctx, ref, img.Layer.Digest, 5, 100)
	if err != nil || !bytes.Equal(got, img.Layers[0][5:105]) {
		t.Fatalf("ReadRange via mirror: %v", err)
	}
	if mirror.BlobBytes() != 100 {
		t.Fatalf("mirror served %d bytes, want 100", mirror.BlobBytes())
	}
	// The mirror lacks the manifest: Resolve falls through to the origin.
	if d, err := c.Resolve(ctx, ref); err != nil || d.Digest != img.Desc.Digest {
		t.Fatalf("Resolve with mirror lacking the tag: %v", err)
	}
	mirror.SetDown(true)
	mirror.ResetCounters()
	got, err = c.ReadRange(ctx, ref, img.Layer.Digest, 0, 10)
	if err != nil || !bytes.Equal(got, img.Layers[0][:10]) {
		t.Fatalf("ReadRange with mirror down: %v", err)
	}
	if mirror.BlobBytes() != 0 {
		t.Fatal("down mirror served bytes")
	}
}

func TestAuth(t *testing.T) {
	users := map[string]string{"alice": "s3cret"}
	for _, tc := range []struct {
		name string
		opts testenv.RegistryOptions
	}{
		{"basic", testenv.RegistryOptions{Htpasswd: users}},
		{"token", testenv.RegistryOptions{Htpasswd: users, Token: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := testenv.Registry(t, tc.opts)
			ctx := testCtx(t)
			good := newClient(t, Options{Username: "alice", Password: "s3cret"})
			ref := mustRef(t, reg.Host+"/secure:v1")
			img := pushImage(t, good, ref, "linux/amd64", false, "v1", 1<<16)
			if _, err := good.Resolve(ctx, ref); err != nil {
				t.Fatalf("Resolve with good password: %v", err)
			}
			before := reg.TokenRequests()
			for i := int64(0); i < 50; i++ {
				got, err := good.ReadRange(ctx, ref, img.Layer.Digest, i*100, 100)
				if err != nil || !bytes.Equal(got, img.Layers[0][i*100:i*100+100]) {
					t.Fatalf("ReadRange %d: %v", i, err)
				}
			}
			if n := reg.TokenRequests() - before; n > 1 {
				t.Fatalf("50 range reads cost %d token requests, want at most 1", n)
			}
			for name, opts := range map[string]Options{
				"bad password": {Username: "alice", Password: "wrong"},
				"anonymous":    {},
			} {
				bad := newClient(t, opts)
				if _, err := bad.Resolve(ctx, ref); !errors.Is(err, ErrUnauthorized) {
					t.Errorf("%s: Resolve: %v, want ErrUnauthorized", name, err)
				}
				if _, err := bad.ReadRange(ctx, ref, img.Layer.Digest, 0, 1); !errors.Is(err, ErrUnauthorized) {
					t.Errorf("%s: ReadRange: %v, want ErrUnauthorized", name, err)
				}
			}
			t.Setenv(EnvUsername, "alice")
			t.Setenv(EnvPassword, "s3cret")
			if _, err := newClient(t, Options{}).Resolve(ctx, ref); err != nil {
				t.Fatalf("Resolve with credentials from env: %v", err)
			}
		})
	}
}

func TestDockerConfigCredentials(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{Htpasswd: map[string]string{"bob": "pw"}})
	cfg := t.TempDir() + "/config.json"
	b, _ := json.Marshal(map[string]any{"auths": map[string]any{reg.Host: map[string]string{"username": "bob", "password": "pw"}}})
	if err := writeFile(cfg, b); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, Options{DockerConfig: cfg})
	ref := mustRef(t, reg.Host+"/cfg:v1")
	pushImage(t, c, ref, "linux/amd64", false, "v1", 10)
	if _, err := c.Resolve(testCtx(t), ref); err != nil {
		t.Fatalf("Resolve with docker config credentials: %v", err)
	}
}

// pushArtifact pushes a streaming artifact manifest for subject created at
// created and returns its descriptor.
func pushArtifact(t *testing.T, c *Client, ref Ref, subject ocispec.Descriptor, created time.Time) ocispec.Descriptor {
	t.Helper()
	pushBlob(t, c, ref, artifact.MediaTypeConfig, artifact.EmptyConfigBytes)
	blob := pushBlob(t, c, ref, artifact.MediaTypeStreamingLayer, randomBytes(t, 64))
	toc := pushBlob(t, c, ref, artifact.MediaTypeTOC, randomBytes(t, 32))
	l := artifact.Layer{
		Original: digest.FromString("orig"), DiffID: digest.FromString("diff"),
		Blob: artifact.Descriptor{MediaType: blob.MediaType, Digest: blob.Digest, Size: blob.Size},
		TOC:  artifact.Descriptor{MediaType: toc.MediaType, Digest: toc.Digest, Size: toc.Size},
	}
	b, err := artifact.BuildManifest(subject, []artifact.Layer{l}, created)
	if err != nil {
		t.Fatal(err)
	}
	d, err := c.PushManifest(testCtx(t), ref, ocispec.MediaTypeImageManifest, b, "")
	if err != nil {
		t.Fatalf("push artifact: %v", err)
	}
	d.ArtifactType = artifact.ArtifactType
	return d
}

func TestReferrersFallbackAndFindArtifact(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c := newClient(t, Options{})
	ctx := testCtx(t)
	ref := mustRef(t, reg.Host+"/art:v1")
	img := pushImage(t, c, ref, "linux/amd64", false, "v1", 100)
	other := pushImage(t, c, ref, "linux/arm64", false, "v2", 100)
	subject := img.Desc
	subject.Platform = nil

	if _, _, err := c.FindArtifact(ctx, ref, subject); !errors.Is(err, ErrNoArtifact) {
		t.Fatalf("FindArtifact before any artifact: %v, want ErrNoArtifact", err)
	}
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	old := pushArtifact(t, c, ref, subject, t0)
	newest := pushArtifact(t, c, ref, subject, t0.Add(time.Hour))
	mid := pushArtifact(t, c, ref, subject, t0.Add(time.Minute))

	// distribution 2.8 has no referrers API: PushManifest maintained the
	// sha256-<hex> tag index.
	if _, err := c.Resolve(ctx, Ref{Host: ref.Host, Repository: ref.Repository, Tag: artifact.TagFallback(subject.Digest)}); err != nil {
		t.Fatalf("fallback tag index missing: %v", err)
	}
	list, err := c.Referrers(ctx, ref, subject, artifact.ArtifactType)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 {
		t.Fatalf("Referrers = %d entries, want 3: %+v", len(list), list)
	}
	if l, _ := c.Referrers(ctx, ref, subject, "application/other"); len(l) != 0 {
		t.Fatalf("Referrers filtered by another type = %d entries", len(l))
	}

	// An artifact of another image, recorded under this image's tag index
	// by mistake (or malice), is rejected by its subject.
	foreign := pushArtifact(t, c, ref, ocispec.Descriptor{MediaType: other.Desc.MediaType, Digest: other.Desc.Digest, Size: other.Desc.Size}, t0.Add(48*time.Hour))
	for i := 0; i < 2; i++ { // idempotent
		if err := c.AddReferrer(ctx, ref, subject, foreign); err != nil {
			t.Fatalf("AddReferrer: %v", err)
		}
	}
	if list, _ = c.Referrers(ctx, ref, subject, artifact.ArtifactType); len(list) != 4 {
		t.Fatalf("after AddReferrer: %d referrers, want 4", len(list))
	}
	m, d, err := c.FindArtifact(ctx, ref, subject)
	if err != nil {
		t.Fatal(err)
	}
	if d.Digest != newest.Digest || !m.Created.Equal(t0.Add(time.Hour)) || m.Subject.Digest != subject.Digest {
		t.Fatalf("FindArtifact = %s created %s, want %s (old %s, mid %s)", d.Digest, m.Created, newest.Digest, old.Digest, mid.Digest)
	}
	if len(m.Layers) != 1 {
		t.Fatalf("artifact layers = %d", len(m.Layers))
	}
}

func TestFindArtifactTieBreak(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c := newClient(t, Options{})
	ctx := testCtx(t)
	ref := mustRef(t, reg.Host+"/tie:v1")
	img := pushImage(t, c, ref, "linux/amd64", false, "v1", 100)
	subject := ocispec.Descriptor{MediaType: img.Desc.MediaType, Digest: img.Desc.Digest, Size: img.Desc.Size}
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	a := pushArtifact(t, c, ref, subject, t0)
	b := pushArtifact(t, c, ref, subject, t0)
	want := a.Digest
	if b.Digest.String() > want.String() {
		want = b.Digest
	}
	if _, d, err := c.FindArtifact(ctx, ref, subject); err != nil || d.Digest != want {
		t.Fatalf("FindArtifact tie = %s, %v; want greatest digest %s", d.Digest, err, want)
	}
}
