package bench

import (
	"context"
	"errors"
	"github.com/streamer-dev/streamer/integration/harness"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

var (
	layerA = digest.FromString("a")
	layerB = digest.FromString("b")
	layerC = digest.FromString("c")
)

func TestIncomplete(t *testing.T) {
	im := PulledImage{Ref: "reg/app:v1", Layers: []digest.Digest{layerA, layerB}}
	tests := []struct {
		name    string
		st      SnapshotterStatus
		images  []PulledImage
		pending []digest.Digest
		err     string
	}{
		{name: "nothing mounted yet", images: []PulledImage{im}, pending: []digest.Digest{layerA, layerB}},
		{name: "one complete", images: []PulledImage{im},
			st:      SnapshotterStatus{Layers: []StatusLayer{{Layer: layerA, Complete: true}, {Layer: layerB}}},
			pending: []digest.Digest{layerB}},
		{name: "all complete", images: []PulledImage{im},
			st: SnapshotterStatus{Layers: []StatusLayer{{Layer: layerA, Complete: true}, {Layer: layerB, Complete: true}}}},
		{name: "layers of other images do not count", images: []PulledImage{im},
			st:      SnapshotterStatus{Layers: []StatusLayer{{Layer: layerA, Complete: true}, {Layer: layerC, Complete: true}}},
			pending: []digest.Digest{layerB}},
		{name: "a layer left to an ordinary pull is local", images: []PulledImage{im},
			st: SnapshotterStatus{Layers: []StatusLayer{{Layer: layerA, Complete: true}},
				Images: []StatusImage{{Image: "reg/app:v1", StreamedLayers: 1, PulledLayers: 1}}}},
		{name: "a layer shared by two images counts once, whatever image it was mounted for",
			images: []PulledImage{im, {Ref: "reg/other:v1", Layers: []digest.Digest{layerA, layerC}}},
			st: SnapshotterStatus{Layers: []StatusLayer{
				{Image: "reg/app:v1", Layer: layerA, Complete: true}, {Image: "reg/app:v1", Layer: layerB, Complete: true},
				{Image: "reg/other:v1", Layer: layerC}}},
			pending: []digest.Digest{layerC}},
		{name: "a bad layer never completes", images: []PulledImage{im},
			st:  SnapshotterStatus{Layers: []StatusLayer{{Layer: layerA, Complete: true}, {Layer: layerB, Bad: true}}},
			err: "failed its diffID check"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pending, err := tc.st.Incomplete(tc.images)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("Incomplete = %v, %v; want an error saying %q", pending, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(digestStrings(pending), ",") != strings.Join(digestStrings(tc.pending), ",") {
				t.Errorf("Incomplete = %v, want %v", pending, tc.pending)
			}
		})
	}
}

func digestStrings(ds []digest.Digest) []string {
	s := make([]string, len(ds))
	for i, d := range ds {
		s[i] = d.String()
	}
	return s
}

// fakeStatus answers with the statuses in turn, the last one from then on.
type fakeStatus struct {
	mu    sync.Mutex
	calls int
	steps []func() (*SnapshotterStatus, error)
}

func (f *fakeStatus) get(context.Context) (*SnapshotterStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := min(f.calls, len(f.steps)-1)
	f.calls++
	return f.steps[i]()
}

func status(complete ...bool) func() (*SnapshotterStatus, error) {
	return func() (*SnapshotterStatus, error) {
		st := &SnapshotterStatus{}
		for i, d := range []digest.Digest{layerA, layerB} {
			st.Layers = append(st.Layers, StatusLayer{Layer: d, Complete: complete[i]})
		}
		return st, nil
	}
}

func failing() (*SnapshotterStatus, error) { return nil, errors.New("connection refused") }

func TestCompletePollWait(t *testing.T) {
	im := []PulledImage{{Ref: "reg/app:v1", Layers: []digest.Digest{layerA, layerB}}}
	tests := []struct {
		name     string
		steps    []func() (*SnapshotterStatus, error)
		limit    time.Duration
		complete bool
		calls    int // exactly, or at least when atLeast
		atLeast  bool
		why      string
	}{
		{name: "complete at the first poll", steps: []func() (*SnapshotterStatus, error){status(true, true)}, limit: time.Minute, complete: true, calls: 1},
		{name: "complete at the third poll", steps: []func() (*SnapshotterStatus, error){status(false, false), status(true, false), status(true, true)},
			limit: time.Minute, complete: true, calls: 3},
		{name: "transient status errors are retried", steps: []func() (*SnapshotterStatus, error){failing, failing, status(true, true)},
			limit: time.Minute, complete: true, calls: 3},
		{name: "the limit ends the wait", steps: []func() (*SnapshotterStatus, error){status(true, false)},
			limit: 50 * time.Millisecond, calls: 2, atLeast: true, why: "the 50ms limit passed with 1 of 2 layers left"},
		{name: "a status that keeps failing ends the wait", steps: []func() (*SnapshotterStatus, error){failing},
			limit: time.Minute, calls: 4, why: "the snapshotter's status failed 4 times in a row: connection refused"},
		{name: "a bad layer ends the wait", steps: []func() (*SnapshotterStatus, error){status(false, false), func() (*SnapshotterStatus, error) {
			return &SnapshotterStatus{Layers: []StatusLayer{{Layer: layerA, Bad: true}}}, nil
		}}, limit: time.Minute, calls: 2, why: "failed its diffID check"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeStatus{steps: tc.steps}
			start := time.Now()
			res, err := CompletePoll{Status: f.get, Images: im, Interval: 5 * time.Millisecond, Limit: tc.limit, MaxErrors: 4}.Wait(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if res.Complete != tc.complete || !strings.Contains(res.Why, tc.why) {
				t.Errorf("Wait = %+v, want complete %v, why %q", res, tc.complete, tc.why)
			}
			if tc.complete && (res.At.Before(start) || res.At.After(time.Now())) {
				t.Errorf("complete at %v, outside the wait (%v to now)", res.At, start)
			}
			if f.calls != tc.calls && !(tc.atLeast && f.calls >= tc.calls) {
				t.Errorf("%d status requests, want %d", f.calls, tc.calls)
			}
		})
	}
}

func TestCompletePollLimitPending(t *testing.T) {
	f := &fakeStatus{steps: []func() (*SnapshotterStatus, error){status(false, true)}}
	res, err := CompletePoll{Status: f.get, Images: []PulledImage{{Layers: []digest.Digest{layerA, layerB}}}, Interval: time.Millisecond, Limit: 10 * time.Millisecond}.Wait(context.Background())
	if err != nil || res.Complete || len(res.Pending) != 1 || res.Pending[0] != layerA {
		t.Fatalf("Wait = %+v, %v; want not complete with layer a pending", res, err)
	}
	if got := ShortDigests(res.Pending); got != layerA.Encoded()[:12] {
		t.Errorf("ShortDigests = %q", got)
	}
}

func TestCompletePollCanceled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	f := &fakeStatus{steps: []func() (*SnapshotterStatus, error){func() (*SnapshotterStatus, error) {
		cancel()
		return status(false, false)()
	}}}
	done := make(chan error, 1)
	go func() {
		_, err := CompletePoll{Status: f.get, Images: []PulledImage{{Layers: []digest.Digest{layerA}}}, Interval: time.Hour, Limit: time.Hour}.Wait(ctx)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Wait after cancel = %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return when its context was canceled")
	}
}

// TestFetchStatus reads a status as the daemon serves it on a unix socket
// (the shape of `streamer status --output json`).
func TestFetchStatus(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "m.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	body := `{
  "layers": [
    {"image": "reg/app:v1", "layer": "` + layerA.String() + `", "mounts": 1, "compressedSize": 10, "uncompressedSize": 20,
     "cachedBytes": 20, "fetchedPercent": 100, "complete": true, "fetchedBytes": 10, "fetchRate": 0, "mountedAt": "2026-01-01T00:00:00Z"},
    {"image": "reg/app:v1", "layer": "` + layerB.String() + `", "mounts": 1, "compressedSize": 10, "uncompressedSize": 20,
     "cachedBytes": 5, "fetchedPercent": 25, "complete": false, "fetchedBytes": 3, "fetchRate": 1.5, "mountedAt": "2026-01-01T00:00:00Z"}
  ],
  "images": [{"image": "reg/app:v1", "streamedLayers": 2, "pulledLayers": 0, "reason": "streamed", "updated": "2026-01-01T00:00:00Z"}]
}`
	var fail atomic.Bool
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/status" {
			http.NotFound(w, r)
			return
		}
		if fail.Load() {
			http.Error(w, "layer manager not running", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte(body))
	})}
	go srv.Serve(l)
	defer srv.Close()
	c := harness.UnixHTTPClient(sock)
	st, err := FetchStatus(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Layers) != 2 || !st.Layers[0].Complete || st.Layers[1].Complete || st.Layers[1].FetchedBytes != 3 || st.Images[0].StreamedLayers != 2 {
		t.Errorf("status = %+v", st)
	}
	pending, err := st.Incomplete([]PulledImage{{Ref: "reg/app:v1", Layers: []digest.Digest{layerA, layerB}}})
	if err != nil || len(pending) != 1 || pending[0] != layerB {
		t.Errorf("Incomplete = %v, %v; want layer b", pending, err)
	}
	fail.Store(true)
	if _, err := FetchStatus(context.Background(), c); err == nil || !strings.Contains(err.Error(), "503") || !strings.Contains(err.Error(), "layer manager not running") {
		t.Errorf("FetchStatus on a 503 = %v, want the status and body", err)
	}
}

func TestCompletedAt(t *testing.T) {
	im := PulledImage{Ref: "reg/app:v1", Layers: []digest.Digest{layerA, layerB}}
	t1 := time.Date(2026, 1, 1, 0, 0, 1, 0, time.UTC)
	t2 := t1.Add(3 * time.Second)
	st := SnapshotterStatus{Layers: []StatusLayer{
		{Layer: layerA, Complete: true, CompletedAt: &t2},
		{Layer: layerB, Complete: true, CompletedAt: &t1},
		{Layer: layerC, Complete: true, CompletedAt: new(t2.Add(time.Hour))}, // another image's
	}}
	if got := st.CompletedAt([]PulledImage{im}); !got.Equal(t2) {
		t.Errorf("completed at %v; want the later layer's %v", got, t2)
	}
	st.Layers[1].CompletedAt = nil
	if got := st.CompletedAt([]PulledImage{im}); !got.IsZero() {
		t.Errorf("completed at %v with a layer that does not say; want zero (the poll's own time is used)", got)
	}
}
