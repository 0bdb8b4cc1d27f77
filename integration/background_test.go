package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/streamer-dev/streamer/fs"
	"github.com/streamer-dev/streamer/integration/harness"
)

// withMetrics restarts the node's snapshotter with its metrics and status
// served on a unix socket, and background fetch on or off. It returns a
// client of that socket.
func (n *node) withMetrics(t *testing.T, background bool) *http.Client {
	t.Helper()
	sock := filepath.Join(n.dir, "metrics.sock")
	n.cfg.Background = new(background)
	n.cfg.MetricsAddress = sock
	n.reconfigure(t)
	client := harness.UnixHTTPClient(sock)
	t.Cleanup(client.CloseIdleConnections)
	return client
}

// layerStatus reads the snapshotter's GET /status.
func layerStatus(ctx context.Context, client *http.Client) ([]fs.LayerStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://snapshotter/status", nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("get status: %w", err)
	}
	defer resp.Body.Close()
	var st struct {
		Layers []fs.LayerStatus `json:"layers"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("decode status: %w", err)
	}
	return st.Layers, nil
}

// TestNodeBackgroundFetchIndependence runs a pod with background fetch on,
// waits until the status API says every layer of its image is complete,
// stops the registry, and starts a new container of the image: it starts
// and reads its files.
func TestNodeBackgroundFetchIndependence(t *testing.T) {
	forEachContainerd(t, func(t *testing.T, rt harness.ContainerdRuntime) {
		n := startNodeOn(t, rt)
		ctx := testContext(t, 4*time.Minute)
		// The node tests run with background fetch off; turn it on here.
		metrics := n.withMetrics(t, true)
		sock := n.cfg.MetricsAddress

		unread := harness.RandomBytes(81, 12<<20)
		web, err := harness.WebImage("independent", 0, []harness.File{
			harness.Dir("data", 0o755), harness.Reg("data/unread", 0o644, unread),
		})
		if err != nil {
			t.Fatal(err)
		}
		ref, img := n.push(t, ctx, "indep", web, true)
		start := time.Now()
		n.cri.RunWebPod(t, ctx, "first", ref, filepath.Join(n.dir, "logs"))
		ready := time.Since(start)

		// Bounded wait for every layer of the image to be complete.
		var layers []fs.LayerStatus
		deadline := time.Now().Add(60 * time.Second)
		for {
			layers, err = layerStatus(ctx, metrics)
			complete := 0
			for _, l := range layers {
				if l.Image == ref && l.Complete {
					complete++
				}
			}
			if err == nil && complete == len(img.Layers) {
				break
			}
			if time.Now().After(deadline) {
				n.logs(t)
				t.Fatalf("layers not complete 60s after the pod was ready: %+v (err %v)", layers, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Logf("pod ready in %v; every layer complete %v later (%d layers, %d compressed bytes fetched in all)",
			ready.Round(time.Millisecond), time.Since(start.Add(ready)).Round(time.Millisecond), len(img.Layers), n.count.BlobBytes())

		// The CLI shows the same.
		res := streamer(t, ctx, nil, "status", "--address", sock)
		if res.Code != 0 || !strings.Contains(res.Stdout, "yes") || !strings.Contains(res.Stdout, ref) {
			t.Errorf("streamer status: %s", res)
		}

		n.reg.Stop()
		_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200)
		n.count.Reset()
		pod, err := n.cri.RunPod(ctx, "second", filepath.Join(n.dir, "logs"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = pod.Remove(context.Background()) })
		id, err := pod.StartContainer(ctx, harness.ContainerSpec{Name: "second", Image: ref, Command: []string{"/bin/sleep", "600"}})
		if err != nil {
			n.logs(t)
			t.Fatalf("start a new container with the registry stopped: %v", err)
		}
		if err := n.cri.WaitRunning(ctx, id); err != nil {
			n.logs(t)
			t.Fatal(err)
		}
		out, err := n.cri.Exec(ctx, id, 60*time.Second, "/bin/sh", "-c", "sha256sum /data/unread | cut -d' ' -f1")
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(out.Stdout); out.ExitCode != 0 || got != sha(unread) {
			n.logs(t)
			t.Fatalf("the new container reads /data/unread as %q (exit %d: %s) with the registry stopped", got, out.ExitCode, out.Stderr)
		}
		if n := n.count.BlobRequests(); n != 0 {
			t.Errorf("%d blob requests with the registry stopped; want none", n)
		}
		// Those reads went through the layers' FUSE mounts: the latency
		// metric has them.
		for _, op := range []string{"lookup", "read"} {
			series := `streamer_fuse_operation_duration_seconds_count{op="` + op + `"}`
			if v, err := scrapeMetric(ctx, metrics, series); err != nil || v == 0 {
				t.Errorf("%s = %v (%v); want the FUSE %s requests counted", series, v, err, op)
			}
		}
	})
}
