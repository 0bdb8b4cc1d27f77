package fetcher

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// redirectingRegistry is a registry that answers blob reads with a 307 to
// a storage server (as registries backed by object storage or a CDN do),
// requiring basic auth itself, with each redirect carrying a new
// signature; the storage server serves ranges of the blob for signatures
// not revoked and refuses any request carrying credentials.
type redirectingRegistry struct {
	*fakeRegistry
	storage   *httptest.Server
	storageN  atomic.Int64
	mu        sync.Mutex
	sig       int
	revoked   map[string]bool
	withCreds atomic.Int64
}

func newRedirectingRegistry(t *testing.T) *redirectingRegistry {
	t.Helper()
	r := &redirectingRegistry{revoked: map[string]bool{}}
	r.storage = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.storageN.Add(1)
		if req.Header.Get("Authorization") != "" {
			r.withCreds.Add(1)
			http.Error(w, "only one auth mechanism allowed", http.StatusBadRequest)
			return
		}
		r.mu.Lock()
		revoked := r.revoked[req.URL.Query().Get("sig")]
		r.mu.Unlock()
		if revoked || req.URL.Path != "/blobs/"+r.dgst.String() {
			http.Error(w, "request has expired", http.StatusForbidden)
			return
		}
		http.ServeContent(w, req, "", time.Time{}, bytes.NewReader(r.blob))
	}))
	t.Cleanup(r.storage.Close)
	// "localhost" rather than the registry's 127.0.0.1: another host, to
	// which an HTTP client does not forward the registry's credentials.
	storageURL := strings.Replace(r.storage.URL, "127.0.0.1", "localhost", 1)
	r.fakeRegistry = newFake(t, false, func(w http.ResponseWriter, req *http.Request, _ int64) bool {
		if u, p, ok := req.BasicAuth(); !ok || u != "alice" || p != "s3cret" {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return true
		}
		r.mu.Lock()
		r.sig++
		sig := r.sig
		r.mu.Unlock()
		http.Redirect(w, req, fmt.Sprintf("%s/blobs/%s?sig=%d", storageURL, r.dgst, sig), http.StatusTemporaryRedirect)
		return true
	})
	return r
}

// redirects is how many blob reads the registry redirected.
func (r *redirectingRegistry) redirects() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sig
}

func (r *redirectingRegistry) revoke(sig int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.revoked[fmt.Sprint(sig)] = true
}

func (r *redirectingRegistry) read(t *testing.T, c *Client, off, n int64) {
	t.Helper()
	got, err := c.ReadRange(testCtx(t), r.ref, r.dgst, off, n)
	if err != nil {
		t.Fatalf("ReadRange [%d,+%d): %v", off, n, err)
	}
	if !bytes.Equal(got, r.blob[off:off+n]) {
		t.Fatalf("ReadRange [%d,+%d): wrong bytes", off, n)
	}
}

// TestReadRangeRemembersLocation: after one redirect, the range reads of a
// blob go to its storage location without asking the registry, with no
// registry credentials; a location that fails (an expired signature) is
// forgotten and the registry asked again, the read succeeding.
func TestReadRangeRemembersLocation(t *testing.T) {
	r := newRedirectingRegistry(t)
	c := newClient(t, Options{Username: "alice", Password: "s3cret"})
	for i := range int64(5) {
		r.read(t, c, i*1000, 100)
	}
	if n := r.redirects(); n != 1 {
		t.Errorf("the registry redirected %d reads of 5; want 1, then the location", n)
	}
	if n := r.storageN.Load(); n != 5 {
		t.Errorf("storage served %d requests; want 5", n)
	}
	if n := c.Redirects(); n != 1 {
		t.Errorf("Redirects() = %d; want 1", n)
	}

	r.revoke(1)
	r.read(t, c, 2000, 4096)
	r.read(t, c, 100, 1)
	if n := r.redirects(); n != 2 {
		t.Errorf("after the signature expired the registry redirected %d reads in all; want 2", n)
	}
	if n := r.storageN.Load(); n != 8 {
		t.Errorf("storage served %d requests; want 8 (5, the refused one, 2 at the new location)", n)
	}
	if n := r.withCreds.Load(); n != 0 {
		t.Errorf("%d requests reached the storage with registry credentials", n)
	}
}

// TestReadRangeLocationTTL: a location is used for LocationTTL only, and
// never with a negative one.
func TestReadRangeLocationTTL(t *testing.T) {
	r := newRedirectingRegistry(t)
	c := newClient(t, Options{Username: "alice", Password: "s3cret", LocationTTL: 50 * time.Millisecond})
	r.read(t, c, 0, 10)
	r.read(t, c, 10, 10)
	if n := r.redirects(); n != 1 {
		t.Fatalf("%d redirects within the TTL; want 1", n)
	}
	time.Sleep(80 * time.Millisecond)
	r.read(t, c, 20, 10)
	if n := r.redirects(); n != 2 {
		t.Errorf("%d redirects after the TTL; want 2", n)
	}

	never := newClient(t, Options{Username: "alice", Password: "s3cret", LocationTTL: -1})
	for i := range int64(3) {
		r.read(t, never, i, 10)
	}
	if n := r.redirects(); n != 5 {
		t.Errorf("%d redirects in all; want 5 (every read of the client without locations)", n)
	}
}

// TestReadRangeSameHostRedirect: a redirect to the registry's own host may
// need the registry's credentials, which a remembered location is not
// sent: such a redirect is followed on every read, never remembered.
func TestReadRangeSameHostRedirect(t *testing.T) {
	f := newFake(t, false, func(w http.ResponseWriter, r *http.Request, _ int64) bool {
		if r.URL.Query().Get("storage") == "" {
			http.Redirect(w, r, r.URL.Path+"?storage=1", http.StatusTemporaryRedirect)
			return true
		}
		return false
	})
	c := newClient(t, Options{})
	for i := range int64(3) {
		got, err := c.ReadRange(testCtx(t), f.ref, f.dgst, i*100, 100)
		if err != nil || !bytes.Equal(got, f.blob[i*100:i*100+100]) {
			t.Fatalf("ReadRange %d: %v", i, err)
		}
	}
	if n := f.blobN.Load(); n != 6 {
		t.Errorf("%d blob requests for 3 reads; want 6 (a redirect and its target each)", n)
	}
	if n := c.Redirects(); n != 0 {
		t.Errorf("Redirects() = %d; want 0", n)
	}
}
