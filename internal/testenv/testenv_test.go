package testenv

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

func get(t *testing.T, url, bearer, user, pass string) (*http.Response, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func TestRegistryAnonymousStopStart(t *testing.T) {
	r := Registry(t, RegistryOptions{})
	if resp, _ := get(t, r.URL+"/v2/", "", "", ""); resp.StatusCode != 200 {
		t.Fatalf("GET /v2/: %s", resp.Status)
	}
	r.Stop()
	if r.Running() {
		t.Fatal("Running after Stop")
	}
	if _, err := http.Get(r.URL + "/v2/"); err == nil {
		t.Fatal("registry still answers after Stop")
	}
	r.Start()
	if resp, _ := get(t, r.URL+"/v2/", "", "", ""); resp.StatusCode != 200 {
		t.Fatalf("GET /v2/ after restart: %s", resp.Status)
	}
}

func TestRegistryBasicAuth(t *testing.T) {
	r := Registry(t, RegistryOptions{Htpasswd: map[string]string{"alice": "s3cret"}})
	for _, tc := range []struct {
		name, user, pass string
		want             int
	}{
		{"anonymous", "", "", 401},
		{"bad password", "alice", "nope", 401},
		{"good", "alice", "s3cret", 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if resp, _ := get(t, r.URL+"/v2/", "", tc.user, tc.pass); resp.StatusCode != tc.want {
				t.Fatalf("GET /v2/: %s, want %d", resp.Status, tc.want)
			}
		})
	}
}

func TestRegistryToken(t *testing.T) {
	r := Registry(t, RegistryOptions{Token: true, Htpasswd: map[string]string{"bob": "pw"}})
	resp, _ := get(t, r.URL+"/v2/foo/tags/list", "", "", "")
	if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer ") {
		t.Fatalf("unauthenticated: %s %q", resp.Status, resp.Header.Get("WWW-Authenticate"))
	}
	tokenFor := func(user, pass string) (int, string) {
		resp, b := get(t, r.TokenURL+"/token?service="+TokenService+"&scope=repository:foo:pull,push", "", user, pass)
		var v struct{ Token string }
		_ = json.Unmarshal(b, &v)
		return resp.StatusCode, v.Token
	}
	if code, _ := tokenFor("bob", "wrong"); code != 401 {
		t.Fatalf("token with bad password: %d, want 401", code)
	}
	_, anon := tokenFor("", "")
	if resp, _ := get(t, r.URL+"/v2/foo/tags/list", anon, "", ""); resp.StatusCode != 401 {
		t.Fatalf("anonymous token must not grant access: %s", resp.Status)
	}
	code, tok := tokenFor("bob", "pw")
	if code != 200 || tok == "" {
		t.Fatalf("token: %d %q", code, tok)
	}
	// Access granted: the repository simply does not exist yet.
	if resp, b := get(t, r.URL+"/v2/foo/tags/list", tok, "", ""); resp.StatusCode != 404 {
		t.Fatalf("with token: %s %s", resp.Status, b)
	}
	// Scope honoured: a token for foo does not open bar.
	if resp, _ := get(t, r.URL+"/v2/bar/tags/list", tok, "", ""); resp.StatusCode != 401 {
		t.Fatalf("token for foo opened bar: %s", resp.Status)
	}
	if r.TokenRequests() != 3 {
		t.Fatalf("TokenRequests = %d, want 3", r.TokenRequests())
	}
}

func TestCountingProxy(t *testing.T) {
	r := Registry(t, RegistryOptions{})
	p := CountingProxy(t, r.Host)
	if resp, _ := get(t, p.URL+"/v2/", "", "", ""); resp.StatusCode != 200 {
		t.Fatalf("via proxy: %s", resp.Status)
	}
	p.SetDown(true)
	if resp, _ := get(t, p.URL+"/v2/", "", "", ""); resp.StatusCode != 503 {
		t.Fatalf("down proxy: %s", resp.Status)
	}
	p.SetDown(false)
	p.SetReset(true)
	if _, err := http.Get(p.URL + "/v2/"); err == nil {
		t.Fatal("reset proxy answered")
	}
	p.SetReset(false)
	// Go's client may retry an idempotent request once on a reset connection.
	if n := p.Requests(); n < 3 || n > 4 {
		t.Fatalf("Requests = %d, want 3 or 4", n)
	}
	if !IsBlobPath("/v2/a/b/blobs/sha256:00") || IsBlobPath("/v2/a/blobs/uploads/x") {
		t.Fatal("IsBlobPath")
	}
}
