package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/fs"
)

// serveStatus serves body as GET /status on a unix socket and on loopback
// TCP, like the daemon's metrics_address.
func serveStatus(t *testing.T, body nodeStatus) (sock, hostport string) {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(body)
	})
	sock = filepath.Join(t.TempDir(), "m.sock")
	for _, l := range []struct{ network, addr string }{{"unix", sock}, {"tcp", "127.0.0.1:0"}} {
		ln, err := net.Listen(l.network, l.addr)
		if err != nil {
			t.Fatal(err)
		}
		if l.network == "tcp" {
			hostport = ln.Addr().String()
		}
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
	}
	return sock, hostport
}

func TestStatusCommand(t *testing.T) {
	layer := digest.FromString("layer")
	body := nodeStatus{Layers: []fs.LayerStatus{{
		Image: "registry.local/app:v1", Layer: layer, Mounts: 1,
		CompressedSize: 3 << 20, UncompressedSize: 4 << 20, CachedBytes: 4 << 20,
		FetchedPercent: 100, Complete: true, FetchRate: 2 << 20,
	}}}
	sock, hostport := serveStatus(t, body)
	tests := []struct {
		name    string
		args    []string
		want    []string
		wantErr bool
	}{
		{"unix socket table", []string{"--address", sock}, []string{"IMAGE", "registry.local/app:v1", layer.String()[:19], "3.0 MiB", "4.0 MiB", "100.0%", "yes", "2.0 MiB/s"}, false},
		{"host:port", []string{"--address", hostport}, []string{"registry.local/app:v1"}, false},
		{"URL", []string{"--address", "http://" + hostport}, []string{"registry.local/app:v1"}, false},
		{"json", []string{"--address", sock, "--output", "json"}, []string{`"complete": true`, `"fetchedPercent": 100`}, false},
		{"no address", nil, nil, true},
		{"nothing listening", []string{"--address", filepath.Join(t.TempDir(), "none.sock")}, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			root := newRootCmd(&out, &errOut)
			root.SetArgs(append([]string{"status"}, tt.args...))
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err := root.ExecuteContext(ctx)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v; out:\n%s", err, tt.wantErr, out.String())
			}
			for _, w := range tt.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
			if tt.name == "json" {
				var got nodeStatus
				if err := json.Unmarshal(out.Bytes(), &got); err != nil || len(got.Layers) != 1 || got.Layers[0].Layer != layer {
					t.Errorf("json output does not decode to the status: %v %+v", err, got)
				}
			}
		})
	}
}
