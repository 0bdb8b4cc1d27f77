package fetcher

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
)

// FuzzContentRange: any Content-Range header a registry sends either is
// refused or parses into a range that makes sense.
func FuzzContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-99/100", "bytes 5-5/*", "bytes 10-9/100", "bytes -1-5/10", "bytes 0-99/99",
		"lines 1-2", "bytes 0-9223372036854775807/*", "bytes 1-2/3/4", "bytes  1-2/3", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		first, last, total, err := parseContentRange(s)
		if err != nil {
			return
		}
		if first < 0 || last < first || (total != -1 && total <= last) {
			t.Fatalf("parseContentRange(%q) = %d, %d, %d: not a range", s, first, last, total)
		}
		tot := "*"
		if total >= 0 {
			tot = fmt.Sprint(total)
		}
		// What parses prints back to something that parses the same.
		again := fmt.Sprintf("bytes %d-%d/%s", first, last, tot)
		f2, l2, t2, err := parseContentRange(again)
		if err != nil || f2 != first || l2 != last || t2 != total {
			t.Fatalf("parseContentRange(%q) = %d,%d,%d; printed %q parses to %d,%d,%d,%v", s, first, last, total, again, f2, l2, t2, err)
		}
	})
}

// fuzzRegistry serves body as the referrers API answer and, for the
// sha256-<hex> tag fallback, as the tagged index, with its media type.
type fuzzRegistry struct {
	once sync.Once
	srv  *httptest.Server
	body atomic.Pointer[[]byte]
	api  atomic.Bool
}

var fuzzReg fuzzRegistry

func (r *fuzzRegistry) start() {
	r.once.Do(func() {
		r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			b := *r.body.Load()
			switch {
			case req.URL.Path == "/v2/":
			case strings.HasPrefix(req.URL.Path, "/v2/r/referrers/") && r.api.Load():
				w.Header().Set("Content-Type", ocispec.MediaTypeImageIndex)
				w.Write(b)
			case strings.HasPrefix(req.URL.Path, "/v2/r/manifests/sha256-") && !r.api.Load():
				w.Header().Set("Content-Type", ocispec.MediaTypeImageIndex)
				w.Header().Set("Docker-Content-Digest", digest.FromBytes(b).String())
				w.Header().Set("Content-Length", fmt.Sprint(len(b)))
				if req.Method == http.MethodGet {
					w.Write(b)
				}
			default:
				http.NotFound(w, req)
			}
		}))
	})
}

// FuzzReferrers: whatever index a registry answers for an image's
// referrers (API or tag fallback), listing them and looking for the
// streaming artifact return an error or a result, never panic or hang.
func FuzzReferrers(f *testing.F) {
	f.Add([]byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`), true)
	f.Add([]byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"`+artifact.ArtifactType+`","digest":"sha256:`+strings.Repeat("a", 64)+`","size":10}]}`), false)
	f.Add([]byte(`{"manifests":[{"digest":"sha256:zz","size":-1}]}`), true)
	f.Add([]byte(`[]`), false)
	fuzzReg.start()
	host := strings.TrimPrefix(fuzzReg.srv.URL, "http://")
	c, err := New(Options{Retries: -1, Timeout: 2 * time.Second, DockerConfig: f.TempDir() + "/config.json"})
	if err != nil {
		f.Fatal(err)
	}
	ref := Ref{Host: host, Repository: "r", Tag: "latest"}
	subject := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString("subject"), Size: 10}
	f.Fuzz(func(t *testing.T, body []byte, api bool) {
		fuzzReg.body.Store(&body)
		fuzzReg.api.Store(api)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		descs, err := c.Referrers(ctx, ref, subject, artifact.ArtifactType)
		if err == nil {
			for _, d := range descs {
				if d.ArtifactType != artifact.ArtifactType && d.ArtifactType != "" {
					// Filtering is the client's when the registry does not say it filtered.
					t.Logf("unfiltered referrer %s of type %q", d.Digest, d.ArtifactType)
				}
			}
		}
		if _, _, err := c.FindArtifact(ctx, ref, subject); err == nil {
			t.Fatalf("FindArtifact found an artifact in an index that points at nothing servable: %q", body)
		}
		if ctx.Err() != nil {
			t.Fatalf("referrers lookup did not finish in 10s on %q", body)
		}
	})
}
