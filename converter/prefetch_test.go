package converter

import (
	"archive/tar"
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/internal/testenv"
)

func dirE(name string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name + "/", Typeflag: tar.TypeDir, Mode: 0o755}}
}
func regE(name, data string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644}, data: []byte(data)}
}
func symE(name, target string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777}}
}
func linkE(name, target string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeLink, Linkname: target, Mode: 0o644}}
}

// prefetchLayers is a three-layer image exercising the merged view: an
// upper layer overriding, whiting out and hiding (opaque) lower files.
func prefetchLayers(t *testing.T) []testLayer {
	t.Helper()
	base := []tarEntry{
		dirE("bin"), regE("bin/sh", "sh v1"), regE("bin/ls", "ls"), symE("bin/link", "ls"),
		dirE("usr"), dirE("usr/lib"), regE("usr/lib/libc.so", "libc"), symE("lib", "usr/lib"),
		dirE("etc"), regE("etc/gone", "gone"), dirE("opt"), regE("opt/old", "old"),
		dirE("srv"), regE("srv/a", "a"),
	}
	mid := []tarEntry{
		dirE("bin"), regE("bin/sh", "sh v2"), regE("bin/real", "real"), linkE("bin/hard", "bin/real"),
		dirE("etc"), regE("etc/.wh.gone", ""),
	}
	top := []tarEntry{
		dirE("opt"), regE("opt/.wh..wh..opq", ""), regE("opt/new", "new"),
		regE("app", "app"),
	}
	var out []testLayer
	for _, es := range [][]tarEntry{base, mid, top} {
		out = append(out, testLayer{tar: buildTar(t, tar.FormatPAX, es, 0), mediaType: ocispec.MediaTypeImageLayerGzip})
	}
	return out
}

func layerTOCs(t *testing.T, layers []testLayer) []*artifact.TOC {
	t.Helper()
	var tocs []*artifact.TOC
	for _, l := range layers {
		res, _ := convert(t, l.tar, LayerOptions{ChunkSize: testChunk})
		tocs = append(tocs, res.TOC)
	}
	return tocs
}

func TestAssignPrefetch(t *testing.T) {
	tocs := layerTOCs(t, prefetchLayers(t))
	cases := []struct {
		name             string
		list             []string
		want             [][]string
		missing, skipped []string
	}{
		{name: "top-most layer wins", list: []string{"/bin/sh", "/bin/ls", "/app"},
			want: [][]string{{"bin/ls"}, {"bin/sh"}, {"app"}}},
		{name: "order kept, duplicates and spellings removed", list: []string{"/app", "bin/ls", "/bin/../bin/ls", "./app", "//usr/lib/libc.so"},
			want: [][]string{{"bin/ls", "usr/lib/libc.so"}, nil, {"app"}}},
		{name: "symlinks followed, in the file and in a parent", list: []string{"/bin/link", "/lib/libc.so", "/bin/ls"},
			want: [][]string{{"bin/ls", "usr/lib/libc.so"}, nil, nil}},
		{name: "hardlink resolves to its target", list: []string{"/bin/hard", "/bin/real"},
			want: [][]string{nil, {"bin/real"}, nil}},
		{name: "whited out and hidden by an opaque dir are missing", list: []string{"/etc/gone", "/opt/old", "/opt/new", "/nope"},
			want: [][]string{nil, nil, {"opt/new"}}, missing: []string{"/etc/gone", "/opt/old", "/nope"}},
		{name: "directories are skipped", list: []string{"/usr/lib", "/", "/srv/a"},
			want: [][]string{{"srv/a"}, nil, nil}, skipped: []string{"/usr/lib", "/"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, ranges, missing, skipped, beyond := AssignPrefetch(tocs, PrefetchPaths(tc.list...))
			for i := range tocs {
				if !slices.Equal(got[i], tc.want[i]) {
					t.Errorf("layer %d: %q, want %q", i, got[i], tc.want[i])
				}
			}
			if !slices.Equal(missing, tc.missing) || !slices.Equal(skipped, tc.skipped) {
				t.Errorf("missing %q skipped %q, want %q %q", missing, skipped, tc.missing, tc.skipped)
			}
			for i, r := range ranges {
				if len(r) != 0 {
					t.Errorf("layer %d: ranges %v for a list of whole files", i, r)
				}
			}
			if len(beyond) != 0 {
				t.Errorf("beyond %q for a list without ranges", beyond)
			}
		})
	}
}

// TestAssignPrefetchRanges: ranges follow their file to the layer and
// name that hold it, a file listed twice gets the union of its ranges (the
// whole file when one line lists it whole), ranges covering the file are
// the whole file, and ranges past its end are cut and reported.
func TestAssignPrefetchRanges(t *testing.T) {
	tocs := layerTOCs(t, prefetchLayers(t))
	rs := func(pairs ...int64) []artifact.Range {
		var out []artifact.Range
		for i := 0; i < len(pairs); i += 2 {
			out = append(out, artifact.Range{Offset: pairs[i], Size: pairs[i+1]})
		}
		return out
	}
	list := []PrefetchFile{
		{Path: "/bin/sh", Ranges: rs(0, 1)},       // "sh v2", layer 1
		{Path: "/bin/hard", Ranges: rs(3, 1)},     // "real" through a hardlink
		{Path: "/bin/real", Ranges: rs(1, 1)},     // the same file again: union
		{Path: "/bin/link", Ranges: rs(0, 2)},     // "ls" whole, said as a range
		{Path: "/lib/libc.so", Ranges: rs(1, 1)},  // through a symlinked dir
		{Path: "/usr/lib/libc.so"},                // listed whole too: whole
		{Path: "/app", Ranges: rs(2, 5)},          // "app": past its end, cut
		{Path: "/bin/sh", Ranges: rs(2, 1, 3, 1)}, // more of sh: merged with 0+1
	}
	per, ranges, missing, skipped, beyond := AssignPrefetch(tocs, list)
	wantPer := [][]string{{"bin/ls", "usr/lib/libc.so"}, {"bin/sh", "bin/real"}, {"app"}}
	wantRanges := [][]artifact.FileRanges{
		nil,
		{{Name: "bin/sh", Ranges: rs(0, 1, 2, 2)}, {Name: "bin/real", Ranges: rs(1, 1, 3, 1)}},
		{{Name: "app", Ranges: rs(2, 1)}},
	}
	for i := range tocs {
		if !slices.Equal(per[i], wantPer[i]) {
			t.Errorf("layer %d: %q, want %q", i, per[i], wantPer[i])
		}
		if !slices.EqualFunc(ranges[i], wantRanges[i], equalFileRanges) {
			t.Errorf("layer %d: ranges %v, want %v", i, ranges[i], wantRanges[i])
		}
	}
	if len(missing)+len(skipped) != 0 || !slices.Equal(beyond, []string{"/app"}) {
		t.Errorf("missing %q skipped %q beyond %q, want only /app beyond", missing, skipped, beyond)
	}
	// What AssignPrefetch gives makes valid TOCs.
	for i, toc := range tocs {
		nt := *toc
		nt.Prefetch, nt.PrefetchRanges = per[i], ranges[i]
		if err := nt.Validate(artifact.Limits{}); err != nil {
			t.Errorf("layer %d: %v", i, err)
		}
	}
}

func TestParsePrefetchList(t *testing.T) {
	got, err := ParsePrefetchList(strings.NewReader("# startup\n/bin/sh\n\n  /etc/passwd  \n#/skip\n/app\n" +
		"/usr/lib/big file\t4096+4096,0+100, 8192+1\n"))
	want := []PrefetchFile{{Path: "/bin/sh"}, {Path: "/etc/passwd"}, {Path: "/app"},
		{Path: "/usr/lib/big file", Ranges: []artifact.Range{{Offset: 0, Size: 100}, {Offset: 4096, Size: 4097}}}}
	if err != nil || !slices.EqualFunc(got, want, func(a, b PrefetchFile) bool { return a.Path == b.Path && slices.Equal(a.Ranges, b.Ranges) }) {
		t.Fatalf("ParsePrefetchList = %v, %v; want %v", got, err, want)
	}
	// A line written by String reads back the same.
	if back, err := ParsePrefetchList(strings.NewReader(want[3].String() + "\n")); err != nil || len(back) != 1 || back[0].String() != want[3].String() {
		t.Errorf("%q read back as %v, %v", want[3].String(), back, err)
	}
	for _, bad := range []string{"/a\t1", "/a\t1+0", "/a\t-1+2", "/a\tx+2", "/a\t1+2,", "/a\t1+9223372036854775807"} {
		_, err := ParsePrefetchList(strings.NewReader("/ok\n" + bad + "\n"))
		if err == nil || !strings.Contains(err.Error(), "line 2 (/a)") {
			t.Errorf("ParsePrefetchList(%q) = %v, want an error naming line 2 and /a", bad, err)
		}
	}
}

// uploads counts the blob uploads a proxy saw.
func uploads(p *testenv.Proxy) int {
	n := 0
	for _, s := range p.Paths() {
		if strings.HasPrefix(s, "POST ") && strings.HasSuffix(s, "/blobs/uploads/") {
			n++
		}
	}
	return n
}

// artifactRanges returns the prefetch ranges of every layer of the
// image's current artifact.
func artifactRanges(t *testing.T, c *fetcher.Client, ref fetcher.Ref, subject ocispec.Descriptor) [][]artifact.FileRanges {
	t.Helper()
	m, _, err := c.FindArtifact(testContext(t), ref, subject)
	if err != nil {
		t.Fatalf("FindArtifact: %v", err)
	}
	var out [][]artifact.FileRanges
	for _, l := range m.Layers {
		toc, err := artifact.DecodeTOC(bytes.NewReader(fetchAll(t, c, ref, ociDesc(l.TOC))), artifact.Limits{})
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, toc.PrefetchRanges)
	}
	return out
}

// artifactPrefetch returns the prefetch list of every layer of the image's
// current artifact, and the artifact.
func artifactPrefetch(t *testing.T, c *fetcher.Client, ref fetcher.Ref, subject ocispec.Descriptor) ([][]string, *artifact.Manifest, ocispec.Descriptor) {
	t.Helper()
	m, desc, err := c.FindArtifact(testContext(t), ref, subject)
	if err != nil {
		t.Fatalf("FindArtifact: %v", err)
	}
	var out [][]string
	for _, l := range m.Layers {
		toc, err := artifact.DecodeTOC(bytes.NewReader(fetchAll(t, c, ref, ociDesc(l.TOC))), artifact.Limits{})
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, toc.Prefetch)
	}
	return out, m, desc
}

func TestConvertPrefetchRevision(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	proxy := testenv.CountingProxy(t, reg.Host)
	c := newClient(t)
	ref := mustRef(t, proxy.Host+"/prefetch/app:v1")
	layers := prefetchLayers(t)
	subject := pushImage(t, c, ref, imageSpec{platform: "linux/amd64", layers: layers}, "v1")
	subject.Platform = nil

	// A first conversion without a list: no prefetch anywhere.
	first, err := Convert(testContext(t), c, ref, testOptions(t))
	if err != nil {
		t.Fatalf("Convert: %v", err)
	}
	pf, _, _ := artifactPrefetch(t, c, ref, subject)
	for i, p := range pf {
		if len(p) != 0 {
			t.Fatalf("layer %d has prefetch %q without a list", i, p)
		}
	}

	// With a list: a new revision, only TOCs uploaded, the old manifest gone.
	proxy.ResetCounters()
	opts := testOptions(t)
	opts.PrefetchList = PrefetchPaths("/app", "/bin/sh", "/bin/ls")
	res, err := Convert(testContext(t), c, ref, opts)
	if err != nil {
		t.Fatalf("Convert with a prefetch list: %v", err)
	}
	r := res[0]
	if r.Existing || r.Replaced.Digest != first[0].Artifact.Digest || r.ReplacedRemains {
		t.Fatalf("result existing=%v replaced=%s remains=%v, want a new revision replacing %s", r.Existing, r.Replaced.Digest, r.ReplacedRemains, first[0].Artifact.Digest)
	}
	pf, m, desc := artifactPrefetch(t, c, ref, subject)
	if desc.Digest != r.Artifact.Digest {
		t.Fatalf("FindArtifact returns %s, want the new revision %s", desc.Digest, r.Artifact.Digest)
	}
	want := [][]string{{"bin/ls"}, {"bin/sh"}, {"app"}}
	for i := range want {
		if !slices.Equal(pf[i], want[i]) {
			t.Errorf("layer %d prefetch %q, want %q", i, pf[i], want[i])
		}
		if m.Layers[i].Blob.Digest != first[0].Layers[i].Blob.Digest {
			t.Errorf("layer %d: streaming blob changed from %s to %s", i, first[0].Layers[i].Blob.Digest, m.Layers[i].Blob.Digest)
		}
	}
	if n := uploads(proxy); n != 3 {
		t.Errorf("%d blob uploads, want 3 (the three TOCs; streaming blobs are reused): %v", n, writes(proxy))
	}
	for _, p := range proxy.Paths() {
		for _, l := range first[0].Layers {
			if strings.HasSuffix(p, l.Blob.Digest.String()) {
				t.Errorf("streaming blob touched: %s", p)
			}
		}
	}
	if _, err := c.FetchManifest(testContext(t), ref, first[0].Artifact); !errors.Is(err, fetcher.ErrNotFound) {
		t.Errorf("old revision still fetchable (err %v); want it deleted", err)
	}
	refs, err := c.Referrers(testContext(t), ref, subject, artifact.ArtifactType)
	if err != nil || len(refs) != 1 {
		t.Errorf("referrers %v (%v), want only the new revision", refs, err)
	}

	// The same list again: nothing written.
	proxy.ResetCounters()
	again, err := Convert(testContext(t), c, ref, opts)
	if err != nil {
		t.Fatalf("Convert again: %v", err)
	}
	if w := writes(proxy); len(w) != 0 || !again[0].Existing || again[0].Artifact.Digest != r.Artifact.Digest {
		t.Errorf("same list again: existing=%v artifact=%s writes %v", again[0].Existing, again[0].Artifact.Digest, w)
	}

	// Ranges: another revision whose TOC narrows the file; the same again
	// writes nothing; ranges past a file's end fail and change nothing.
	opts.PrefetchList = []PrefetchFile{{Path: "/app"}, {Path: "/bin/sh", Ranges: []artifact.Range{{Offset: 1, Size: 2}}}, {Path: "/bin/ls"}}
	ranged, err := Convert(testContext(t), c, ref, opts)
	if err != nil {
		t.Fatalf("Convert with ranges: %v", err)
	}
	if ranged[0].Replaced.Digest != r.Artifact.Digest {
		t.Errorf("ranges replaced %s, want a revision of %s", ranged[0].Replaced.Digest, r.Artifact.Digest)
	}
	if got := artifactRanges(t, c, ref, subject); len(got[0])+len(got[2]) != 0 || len(got[1]) != 1 ||
		!equalFileRanges(got[1][0], artifact.FileRanges{Name: "bin/sh", Ranges: []artifact.Range{{Offset: 1, Size: 2}}}) {
		t.Errorf("prefetch ranges %v, want bin/sh 1+2 in layer 1", got)
	}
	proxy.ResetCounters()
	if again, err := Convert(testContext(t), c, ref, opts); err != nil || !again[0].Existing || len(writes(proxy)) != 0 {
		t.Errorf("same ranges again: %v, existing=%v, writes %v", err, again != nil && again[0].Existing, writes(proxy))
	}
	opts.PrefetchList = []PrefetchFile{{Path: "/bin/sh", Ranges: []artifact.Range{{Offset: 4, Size: 10}}}}
	if _, err := Convert(testContext(t), c, ref, opts); !errors.Is(err, ErrPrefetchBeyond) || !strings.Contains(err.Error(), "/bin/sh") {
		t.Fatalf("Convert with a range past the file = %v, want ErrPrefetchBeyond naming /bin/sh", err)
	}
	if _, _, d := artifactPrefetch(t, c, ref, subject); d.Digest != ranged[0].Artifact.Digest {
		t.Errorf("a failed revision changed the artifact to %s", d.Digest)
	}
	r = ranged[0]

	// Missing paths fail, naming them, and change nothing.
	opts.PrefetchList = PrefetchPaths("/app", "/etc/gone", "/nope")
	if _, err := Convert(testContext(t), c, ref, opts); !errors.Is(err, ErrPrefetchMissing) || !strings.Contains(err.Error(), "/nope") || !strings.Contains(err.Error(), "/etc/gone") {
		t.Fatalf("Convert with missing paths = %v, want ErrPrefetchMissing naming them", err)
	}
	if _, _, d := artifactPrefetch(t, c, ref, subject); d.Digest != r.Artifact.Digest {
		t.Errorf("a failed revision changed the artifact to %s", d.Digest)
	}
	opts.PrefetchIgnoreMissing = true
	res, err = Convert(testContext(t), c, ref, opts)
	if err != nil {
		t.Fatalf("Convert ignoring missing paths: %v", err)
	}
	if pf, _, _ := artifactPrefetch(t, c, ref, subject); !slices.Equal(pf[2], []string{"app"}) || len(pf[0])+len(pf[1]) != 0 {
		t.Errorf("prefetch after ignoring missing: %q", pf)
	}
}

// TestConvertPrefetchFresh: an image without artifact converted with a
// list gets it in its first (and only) revision.
func TestConvertPrefetchFresh(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c := newClient(t)
	ref := mustRef(t, reg.Host+"/prefetch/fresh:v1")
	subject := pushImage(t, c, ref, imageSpec{platform: "linux/amd64", layers: prefetchLayers(t)}, "v1")
	subject.Platform = nil
	opts := testOptions(t)
	opts.PrefetchList = PrefetchPaths("/bin/hard", "/lib/libc.so")
	res, err := Convert(testContext(t), c, ref, opts)
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Existing || res[0].Replaced.Digest != "" {
		t.Errorf("fresh conversion reported existing=%v replaced=%s", res[0].Existing, res[0].Replaced.Digest)
	}
	pf, _, _ := artifactPrefetch(t, c, ref, subject)
	if !slices.Equal(pf[0], []string{"usr/lib/libc.so"}) || !slices.Equal(pf[1], []string{"bin/real"}) || len(pf[2]) != 0 {
		t.Errorf("prefetch lists %q", pf)
	}
	if got := []int{res[0].Layers[0].Prefetch, res[0].Layers[1].Prefetch, res[0].Layers[2].Prefetch}; !slices.Equal(got, []int{1, 1, 0}) {
		t.Errorf("reported prefetch counts %v", got)
	}
	refs, _ := c.Referrers(testContext(t), ref, subject, artifact.ArtifactType)
	if len(refs) != 1 {
		t.Errorf("%d referrers, want 1", len(refs))
	}
}

// TestConvertPrefetchDeleteRefused: a registry that refuses DELETE (as
// distribution does without storage.delete.enabled) keeps the old revision,
// but the new one is the artifact nodes find.
func TestConvertPrefetchDeleteRefused(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	u, _ := url.Parse(reg.URL)
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodDelete {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusMethodNotAllowed)
			w.Write([]byte(`{"errors":[{"code":"UNSUPPORTED","message":"The operation is unsupported."}]}`))
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	c := newClient(t)
	ref := mustRef(t, strings.TrimPrefix(srv.URL, "http://")+"/prefetch/nodelete:v1")
	subject := pushImage(t, c, ref, imageSpec{platform: "linux/amd64", layers: prefetchLayers(t)}, "v1")
	subject.Platform = nil
	first, err := Convert(testContext(t), c, ref, testOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	opts := testOptions(t)
	opts.PrefetchList = PrefetchPaths("/app")
	res, err := Convert(testContext(t), c, ref, opts)
	if err != nil {
		t.Fatalf("Convert with a refused DELETE: %v", err)
	}
	if !res[0].ReplacedRemains || res[0].Replaced.Digest != first[0].Artifact.Digest {
		t.Errorf("replaced %s remains %v, want %s remaining", res[0].Replaced.Digest, res[0].ReplacedRemains, first[0].Artifact.Digest)
	}
	if _, err := c.FetchManifest(testContext(t), ref, first[0].Artifact); err != nil {
		t.Errorf("old revision: %v, want it still in the registry", err)
	}
	_, _, desc := artifactPrefetch(t, c, ref, subject)
	if desc.Digest != res[0].Artifact.Digest {
		t.Errorf("FindArtifact = %s, want the new revision %s", desc.Digest, res[0].Artifact.Digest)
	}
}
