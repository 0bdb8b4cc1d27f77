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
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
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
