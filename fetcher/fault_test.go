package fetcher

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
)

// fakeBlob serves blob (with Range support) on /v2/r/blobs/<digest> and
// lets a test hook in before it.
type fakeRegistry struct {
	blob   []byte
	dgst   digest.Digest
	hook   func(w http.ResponseWriter, r *http.Request, n int64) bool // true: handled
	blobN  atomic.Int64
	srv    *httptest.Server
	ref    Ref
	extras http.HandlerFunc
}

func newFake(t *testing.T, tlsSrv bool, hook func(w http.ResponseWriter, r *http.Request, n int64) bool) *fakeRegistry {
	t.Helper()
	f := &fakeRegistry{blob: randomBytes(t, 1<<16), hook: hook}
	f.dgst = digest.FromBytes(f.blob)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			w.WriteHeader(http.StatusOK)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/v2/r/blobs/") {
			n := f.blobN.Add(1)
			if f.hook != nil && f.hook(w, r, n) {
				return
			}
			if r.URL.Path != "/v2/r/blobs/"+f.dgst.String() {
				http.NotFound(w, r)
				return
			}
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(f.blob))
			return
		}
		if f.extras != nil {
			f.extras(w, r)
			return
		}
		http.NotFound(w, r)
	})
	if tlsSrv {
		f.srv = httptest.NewTLSServer(h)
	} else {
		f.srv = httptest.NewServer(h)
	}
	t.Cleanup(f.srv.Close)
	host := strings.TrimPrefix(strings.TrimPrefix(f.srv.URL, "http://"), "https://")
	f.ref = Ref{Host: host, Repository: "r", Tag: "latest"}
	return f
}

func TestReadRangeFaults(t *testing.T) {
	for _, tc := range []struct {
		name     string
		hook     func(w http.ResponseWriter, r *http.Request, n int64) bool
		opts     Options
		wantErr  error
		minCalls int64
	}{
		{name: "plain 206"},
		{name: "ignores Range: 200 sliced", hook: func(w http.ResponseWriter, r *http.Request, _ int64) bool {
			r.Header.Del("Range")
			return false
		}},
		{name: "wrong Content-Range refused", wantErr: ErrRangeMismatch, hook: func(w http.ResponseWriter, r *http.Request, _ int64) bool {
			w.Header().Set("Content-Range", "bytes 0-99/65536")
			w.Header().Set("Content-Length", "100")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(make([]byte, 100))
			return true
		}},
		{name: "malformed Content-Range refused", wantErr: ErrRangeMismatch, hook: func(w http.ResponseWriter, r *http.Request, _ int64) bool {
			w.Header().Set("Content-Range", "lines 1-2")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(make([]byte, 100))
			return true
		}},
		{name: "short body refused", wantErr: ErrRangeMismatch, opts: Options{Retries: -1}, hook: func(w http.ResponseWriter, r *http.Request, _ int64) bool {
			w.Header().Set("Content-Range", "bytes 1000-1099/65536")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(make([]byte, 50))
			return true
		}},
		{name: "503 twice then ok", minCalls: 3, hook: func(w http.ResponseWriter, r *http.Request, n int64) bool {
			if n <= 2 {
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return true
			}
			return false
		}},
		{name: "429 then ok", minCalls: 2, hook: func(w http.ResponseWriter, r *http.Request, n int64) bool {
			if n == 1 {
				http.Error(w, "slow down", http.StatusTooManyRequests)
				return true
			}
			return false
		}},
		{name: "503 forever", wantErr: ErrUnreachable, minCalls: 3, opts: Options{Retries: 2}, hook: func(w http.ResponseWriter, r *http.Request, n int64) bool {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return true
		}},
		{name: "connection reset then ok", minCalls: 2, hook: func(w http.ResponseWriter, r *http.Request, n int64) bool {
			if n == 1 {
				conn, _, _ := w.(http.Hijacker).Hijack()
				conn.Close()
				return true
			}
			return false
		}},
		{name: "body cut then ok", minCalls: 2, hook: func(w http.ResponseWriter, r *http.Request, n int64) bool {
			if n == 1 {
				conn, buf, _ := w.(http.Hijacker).Hijack()
				fmt.Fprintf(buf, "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 1000-1099/65536\r\nContent-Length: 100\r\n\r\n")
				buf.Write(make([]byte, 10))
				buf.Flush()
				conn.Close()
				return true
			}
			return false
		}},
		{name: "redirect to storage followed", hook: func(w http.ResponseWriter, r *http.Request, n int64) bool {
			if r.URL.Query().Get("storage") == "" {
				http.Redirect(w, r, r.URL.Path+"?storage=1", http.StatusTemporaryRedirect)
				return true
			}
			return false
		}},
		{name: "unauthorized", wantErr: ErrUnauthorized, hook: func(w http.ResponseWriter, r *http.Request, _ int64) bool {
			http.Error(w, "no", http.StatusForbidden)
			return true
		}},
		{name: "missing", wantErr: ErrNotFound, hook: func(w http.ResponseWriter, r *http.Request, _ int64) bool {
			http.NotFound(w, r)
			return true
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, false, tc.hook)
			c := newClient(t, tc.opts)
			got, err := c.ReadRange(testCtx(t), f.ref, f.dgst, 1000, 100)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("ReadRange: %v, want %v", err, tc.wantErr)
				}
			} else if err != nil {
				t.Fatalf("ReadRange: %v", err)
			} else if !bytes.Equal(got, f.blob[1000:1100]) {
				t.Fatal("wrong bytes")
			}
			if n := f.blobN.Load(); n < tc.minCalls {
				t.Fatalf("%d blob requests, want at least %d", n, tc.minCalls)
			}
		})
	}
}

func TestReadRangeCancelAndTimeout(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	hang := func(w http.ResponseWriter, r *http.Request, _ int64) bool {
		select {
		case <-r.Context().Done():
		case <-release:
		}
		return true
	}
	f := newFake(t, false, hang)

	t.Run("cancel", func(t *testing.T) {
		c := newClient(t, Options{})
		ctx, cancel := context.WithCancel(testCtx(t))
		time.AfterFunc(50*time.Millisecond, cancel)
		start := time.Now()
		_, err := c.ReadRange(ctx, f.ref, f.dgst, 0, 10)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("ReadRange after cancel: %v, want context.Canceled", err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("cancel took %v", d)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		c := newClient(t, Options{Timeout: 100 * time.Millisecond})
		_, err := c.ReadRange(testCtx(t), f.ref, f.dgst, 0, 10)
		if !errors.Is(err, ErrUnreachable) {
			t.Fatalf("ReadRange on a hung registry: %v, want ErrUnreachable", err)
		}
	})
}

func TestLoopbackTLSProbe(t *testing.T) {
	f := newFake(t, true, nil)
	c := newClient(t, Options{})
	got, err := c.ReadRange(testCtx(t), f.ref, f.dgst, 7, 9)
	if err != nil || !bytes.Equal(got, f.blob[7:16]) {
		t.Fatalf("ReadRange over loopback TLS: %v", err)
	}
	if s := c.schemes[f.ref.Host]; s != "https" {
		t.Fatalf("scheme = %q, want https", s)
	}
	// Non-loopback hosts are never downgraded.
	if c.isInsecure("registry.example:443") || !c.isInsecure("localhost:5000") || !c.isInsecure("[::1]:5000") {
		t.Fatal("isInsecure")
	}
}

func TestUnsupportedMediaType(t *testing.T) {
	f := newFake(t, false, nil)
	body := []byte(`{"schemaVersion":1,"name":"r","tag":"latest","fsLayers":[]}`)
	const schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
	d := digest.FromBytes(body)
	f.extras = func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v2/r/manifests/") {
			w.Header().Set("Content-Type", schema1)
			w.Header().Set("Docker-Content-Digest", d.String())
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			if r.Method == http.MethodGet {
				w.Write(body)
			}
			return
		}
		http.NotFound(w, r)
	}
	c := newClient(t, Options{})
	if _, err := c.ImageManifests(testCtx(t), f.ref, ""); !errors.Is(err, ErrUnsupportedMediaType) {
		t.Fatalf("ImageManifests of schema 1: %v, want ErrUnsupportedMediaType", err)
	}
}

func TestReferrersAPI(t *testing.T) {
	f := newFake(t, false, nil)
	subject := digest.FromString("subject")
	art := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: artifact.ArtifactType, Digest: digest.FromString("a"), Size: 1}
	other := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: "application/sbom", Digest: digest.FromString("b"), Size: 1}
	var puts atomic.Int64
	f.extras = func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v2/r/referrers/"+subject.String():
			list := []ocispec.Descriptor{art, other}
			if at := r.URL.Query().Get("artifactType"); at != "" {
				list = []ocispec.Descriptor{art}
				w.Header().Set("OCI-Filters-Applied", "artifactType")
			}
			w.Header().Set("Content-Type", ocispec.MediaTypeImageIndex)
			json.NewEncoder(w).Encode(ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: list})
		case r.Method == http.MethodPut:
			puts.Add(1)
			http.Error(w, "no", http.StatusMethodNotAllowed)
		default:
			http.NotFound(w, r)
		}
	}
	c := newClient(t, Options{})
	ctx := testCtx(t)
	sd := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: subject, Size: 10}
	got, err := c.Referrers(ctx, f.ref, sd, artifact.ArtifactType)
	if err != nil || len(got) != 1 || got[0].Digest != art.Digest {
		t.Fatalf("Referrers via API = %v, %v", got, err)
	}
	if all, _ := c.Referrers(ctx, f.ref, sd, ""); len(all) != 2 {
		t.Fatalf("Referrers unfiltered = %d", len(all))
	}
	if err := c.AddReferrer(ctx, f.ref, sd, art); err != nil || puts.Load() != 0 {
		t.Fatalf("AddReferrer with the referrers API: err %v, %d PUTs (want none)", err, puts.Load())
	}
}
