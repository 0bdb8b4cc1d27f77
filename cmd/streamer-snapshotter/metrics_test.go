package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// unixClient is an HTTP client of the unix socket sock.
func unixClient(t *testing.T, sock string) *http.Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

// TestReadyz: /readyz follows the ready function (503 until the snapshots
// API serves, 200 after, 503 again while shutting down); /healthz answers
// throughout.
func TestReadyz(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "m.sock")
	var ready atomic.Bool
	stop, err := serveMetrics(sock, ready.Load)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	client := unixClient(t, sock)
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := client.Get("http://metrics" + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, step := range []struct {
		name       string
		ready      bool
		wantStatus int
		wantBody   string
	}{
		{"starting", false, http.StatusServiceUnavailable, "not serving"},
		{"serving", true, http.StatusOK, "ready"},
		{"shutting down", false, http.StatusServiceUnavailable, "not serving"},
	} {
		ready.Store(step.ready)
		if code, body := get("/readyz"); code != step.wantStatus || !strings.Contains(body, step.wantBody) {
			t.Errorf("%s: /readyz %d %q, want %d %q", step.name, code, body, step.wantStatus, step.wantBody)
		}
		if code, _ := get("/healthz"); code != http.StatusOK {
			t.Errorf("%s: /healthz %d, want 200", step.name, code)
		}
	}
}

// TestStatusOnlyOnUnixSocket: on a TCP metrics address (open to every local
// user) /metrics answers but /status and /profile are refused with a
// reason; on the unix socket (mode 0660) they are served.
func TestStatusOnlyOnUnixSocket(t *testing.T) {
	always := func() bool { return true }
	// serveMetrics takes an address: find a free port, then serve on it.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	stop, err := serveMetrics(addr, always)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	get := func(c *http.Client, url string) (int, string) {
		t.Helper()
		resp, err := c.Get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	tcp := &http.Client{Timeout: 5 * time.Second}
	if code, body := get(tcp, "http://"+addr+"/metrics"); code != http.StatusOK || !strings.Contains(body, "go_goroutines") {
		t.Errorf("TCP /metrics: %d", code)
	}
	for _, p := range []string{"/status", "/profile"} {
		if code, body := get(tcp, "http://"+addr+p); code != http.StatusForbidden || !strings.Contains(body, "unix socket") {
			t.Errorf("TCP %s: %d %q; want 403 naming the unix socket", p, code, body)
		}
	}

	sock := filepath.Join(t.TempDir(), "m.sock")
	stopUnix, err := serveMetrics(sock, always)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stopUnix)
	unix := unixClient(t, sock)
	// No filesystem runs in this test: the endpoint answers that, not 403.
	if code, body := get(unix, "http://metrics/status"); code == http.StatusForbidden || code == http.StatusNotFound {
		t.Errorf("unix /status: %d %q; want it served", code, body)
	}
}
