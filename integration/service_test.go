package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/integration/harness"
	"github.com/streamer-dev/streamer/internal/testenv"
)

const (
	svcToken  = "integration-token"
	svcSecret = "integration-webhook-secret"
)

// serviceEnv is a registry whose notifications go to a `streamer serve`
// process, which the test can kill and start again on the same state.
type serviceEnv struct {
	t     *testing.T
	reg   *testenv.Reg
	addr  string
	state string
	logs  string
	proc  *harness.Process
	rc    registryClient
}

func startServiceEnv(t *testing.T) *serviceEnv {
	t.Helper()
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	e := &serviceEnv{t: t, addr: fmt.Sprintf("127.0.0.1:%d", port), state: t.TempDir(), logs: filepath.Join(t.TempDir(), "serve.log")}
	e.reg = testenv.Registry(t, testenv.RegistryOptions{Notifications: []testenv.NotificationEndpoint{{
		URL:     "http://" + e.addr + "/v1/webhooks/registry",
		Headers: map[string]string{"Authorization": "Bearer " + svcSecret},
		Backoff: 100 * time.Millisecond,
	}}})
	e.rc = registryClient{host: e.reg.Host}
	e.start()
	t.Cleanup(func() {
		if e.proc != nil {
			e.proc.Stop(5 * time.Second)
		}
		if t.Failed() {
			t.Logf("streamer serve log tail:\n%s", harness.FileTail(e.logs, 40))
		}
	})
	return e
}

func (e *serviceEnv) start() {
	e.t.Helper()
	b := needBinaries(e.t)
	p, err := harness.StartProcess(b.Streamer, e.logs, "serve", "--listen", e.addr, "--state", e.state, "--workers", "1",
		"--token", svcToken, "--webhook-secret", svcSecret)
	if err != nil {
		e.t.Fatal(err)
	}
	e.proc = p
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := harness.WaitFor(ctx, p, "streamer serve", func(ctx context.Context) error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+e.addr+"/healthz", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	}); err != nil {
		e.t.Fatalf("streamer serve did not start: %v\n%s", err, p.LogTail(20))
	}
}

func (e *serviceEnv) env() []string {
	return []string{"STREAMER_SERVER=http://" + e.addr, "STREAMER_SERVER_TOKEN=" + svcToken}
}

func (e *serviceEnv) cli(ctx context.Context, args ...string) cliResult {
	e.t.Helper()
	return streamer(e.t, ctx, e.env(), args...)
}

// opJSON is the part of an operation the tests read.
type opJSON struct {
	ID       string        `json:"id"`
	State    string        `json:"state"`
	Attempts int           `json:"attempts"`
	Error    string        `json:"error"`
	Artifact digest.Digest `json:"artifact"`
	Digest   digest.Digest `json:"digest"`
}

// show runs `operation show` and decodes it; ok is false on a non-zero exit.
func (e *serviceEnv) show(ctx context.Context, args ...string) (opJSON, cliResult) {
	e.t.Helper()
	res := e.cli(ctx, append([]string{"operation", "show", "-o", "json"}, args...)...)
	var op opJSON
	if res.Code == 0 {
		if err := json.Unmarshal([]byte(res.Stdout), &op); err != nil {
			e.t.Fatalf("decode operation: %v: %s", err, res.Stdout)
		}
	}
	return op, res
}

// waitState polls `operation show` until the operation reaches want (or a
// final state other than want, which fails the test).
func (e *serviceEnv) waitState(ctx context.Context, want string, args ...string) opJSON {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 40*time.Second)
	defer cancel()
	for {
		op, res := e.show(ctx, args...)
		if res.Code == 0 && op.State == want {
			return op
		}
		if res.Code == 0 && op.State != want && (op.State == "succeeded" || op.State == "failed" || op.State == "canceled") {
			e.t.Fatalf("operation %s is %s (error %q), want %s", op.ID, op.State, op.Error, want)
		}
		select {
		case <-ctx.Done():
			e.t.Fatalf("operation %v never became %s: last %+v %s", args, want, op, res)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// operations counts the service's operations (API).
func (e *serviceEnv) operations(ctx context.Context) int {
	e.t.Helper()
	var ops []json.RawMessage
	e.api(ctx, http.MethodGet, "/v1/operations", "Bearer "+svcToken, "", http.StatusOK, &ops)
	return len(ops)
}

func (e *serviceEnv) api(ctx context.Context, method, path, auth, body string, want int, out any) {
	e.t.Helper()
	req, _ := http.NewRequestWithContext(ctx, method, "http://"+e.addr+path, strings.NewReader(body))
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != want {
		e.t.Fatalf("%s %s: %s, want %d", method, path, resp.Status, want)
	}
	if out != nil {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			e.t.Fatalf("decode %s: %v", path, err)
		}
	}
}

func smallImage(page string) harness.Image {
	return harness.Image{Layers: [][]harness.File{{harness.Dir("www", 0o755), harness.Reg("www/index.html", 0o644, []byte(page))}}}
}

// TestService runs the conversion service against a registry that notifies
// it: auto-conversion, disable, cancel, kill -9 and restart, bad input.
func TestService(t *testing.T) {
	needBinaries(t)
	ctx := testContext(t, 85*time.Second)
	e := startServiceEnv(t)
	host := e.reg.Host

	t.Run("auto-conversion", func(t *testing.T) {
		if res := e.cli(ctx, "update", "--repository", host+"/auto", "--enable-streaming", "true"); res.Code != 0 {
			t.Fatalf("update: %s", res)
		}
		lay := harness.BuildAndPush(t, layoutDir(t, "auto"), e.reg.Ref("auto", ":v1"), harness.PushOptions{}, smallImage("one"))
		op := e.waitState(ctx, "succeeded", "--image", e.reg.Ref("auto", ":v1"))
		if op.Digest != lay.Images[0].Manifest.Digest || op.Artifact == "" {
			t.Fatalf("operation %+v for manifest %s", op, lay.Images[0].Manifest.Digest)
		}
		arts := e.rc.artifactsFor(t, ctx, "auto", op.Digest)
		if len(arts) != 1 {
			t.Fatalf("%d artifacts, want 1", len(arts))
		}
		if res := e.cli(ctx, "list"); res.Code != 0 || !strings.Contains(res.Stdout, host+"/auto") || !strings.Contains(res.Stdout, op.Artifact.String()) {
			t.Fatalf("list: %s", res)
		}
	})

	t.Run("disable", func(t *testing.T) {
		if res := e.cli(ctx, "update", "--repository", host+"/auto", "--enable-streaming", "false"); res.Code != 0 {
			t.Fatalf("update: %s", res)
		}
		harness.BuildAndPush(t, layoutDir(t, "auto2"), e.reg.Ref("auto", ":v2"), harness.PushOptions{}, smallImage("two"))
		// Notifications go out in order: once a later push to an enabled
		// repository is converted, the v2 event has been handled.
		if res := e.cli(ctx, "update", "--repository", host+"/sentinel", "--enable-streaming", "true"); res.Code != 0 {
			t.Fatalf("update: %s", res)
		}
		harness.BuildAndPush(t, layoutDir(t, "sentinel"), e.reg.Ref("sentinel", ":v1"), harness.PushOptions{}, smallImage("three"))
		e.waitState(ctx, "succeeded", "--image", e.reg.Ref("sentinel", ":v1"))
		if _, res := e.show(ctx, "--image", e.reg.Ref("auto", ":v2")); res.Code != exitNotFound {
			t.Fatalf("disabled repository converted a push: %s", res)
		}
		res := e.cli(ctx, "show", "--repository", host+"/auto")
		if res.Code != 0 || !strings.Contains(strings.Join(strings.Fields(res.Stdout), " "), "Streaming: false") || !strings.Contains(res.Stdout, host+"/auto:v1") {
			t.Fatalf("show: %s", res)
		}
		if res := e.cli(ctx, "referrers", e.reg.Ref("auto", ":v1")); res.Code != 0 || !strings.Contains(res.Stdout, "application/vnd.streamer.artifact.v1") {
			t.Fatalf("existing artifact gone: %s", res)
		}
		if res := e.cli(ctx, "inspect", e.reg.Ref("auto", ":v1")); res.Code != 0 {
			t.Fatalf("existing artifact unusable: %s", res)
		}
	})

	// A 32 MiB layer read over a 4 MiB/s link (a pacing proxy in front of
	// the registry) makes each conversion last about 8 s, whatever the
	// machine's speed: long enough to cancel it, and to kill the service in
	// its middle.
	big := harness.Image{Layers: [][]harness.File{{harness.Reg("blob", 0o644, harness.RandomBytes(42, 32<<20))}}}
	bigLay := harness.BuildAndPush(t, layoutDir(t, "big"), e.reg.Ref("big", ":v1"), harness.PushOptions{}, big)
	bigDigest := bigLay.Images[0].Manifest.Digest
	slow := testenv.CountingProxy(t, e.reg.Host)
	slow.SetRate(4 << 20)
	bigRef := slow.Host + "/big:v1"

	t.Run("cancel", func(t *testing.T) {
		res := e.cli(ctx, "create", "--image", bigRef, "--no-wait")
		id := strings.TrimSpace(res.Stdout)
		if res.Code != 0 || id == "" {
			t.Fatalf("create: %s", res)
		}
		e.waitState(ctx, "running", "--id", id)
		if res := e.cli(ctx, "operation", "cancel", "--id", id); res.Code != 0 || !strings.Contains(res.Stdout, "canceled") {
			t.Fatalf("cancel: %s", res)
		}
		op, _ := e.show(ctx, "--id", id)
		if op.State != "canceled" || op.Artifact != "" {
			t.Fatalf("after cancel: %+v", op)
		}
		if arts := e.rc.artifactsFor(t, ctx, "big", bigDigest); len(arts) != 0 {
			t.Fatalf("canceled conversion left %d artifacts referenced", len(arts))
		}
		if res := e.cli(ctx, "operation", "cancel", "--id", id); res.Code == 0 {
			t.Fatalf("second cancel succeeded: %s", res)
		}
	})

	t.Run("kill and restart", func(t *testing.T) {
		res := e.cli(ctx, "create", "--image", bigRef, "--no-wait")
		id := strings.TrimSpace(res.Stdout)
		if res.Code != 0 || id == "" {
			t.Fatalf("create: %s", res)
		}
		e.waitState(ctx, "running", "--id", id)
		e.proc.Kill()
		e.start()
		op := e.waitState(ctx, "succeeded", "--id", id)
		if op.Attempts != 2 {
			t.Errorf("attempts %d, want 2 (one before the kill, one after)", op.Attempts)
		}
		if arts := e.rc.artifactsFor(t, ctx, "big", bigDigest); len(arts) != 1 {
			t.Fatalf("%d artifacts after restart, want exactly 1", len(arts))
		}
	})

	t.Run("bad input", func(t *testing.T) {
		before := e.operations(ctx)
		cases := []struct {
			name string
			args []string
			code int
			says string
		}{
			{"unknown image", []string{"create", "--image", e.reg.Ref("nothing", ":here")}, exitNotFound, "not found"},
			{"bad repository", []string{"update", "--repository", host + "/Bad//Name", "--enable-streaming", "true"}, exitUsage, "repository name"},
			{"unknown operation", []string{"operation", "show", "--id", "doesnotexist"}, exitNotFound, "not found"},
			{"cancel unknown operation", []string{"operation", "cancel", "--id", "doesnotexist"}, exitNotFound, "not found"},
			{"wrong token", []string{"operation", "show", "--id", "x", "--token", "wrong"}, exitUnauthz, "unauthorized"},
		}
		for _, tc := range cases {
			res := e.cli(ctx, tc.args...)
			if res.Code != tc.code || !strings.Contains(res.Stderr, tc.says) {
				t.Errorf("%s: %s; want exit %d saying %q", tc.name, res, tc.code, tc.says)
			}
		}
		e.api(ctx, http.MethodPost, "/v1/webhooks/registry", "Bearer wrong", `{"events":[]}`, http.StatusUnauthorized, nil)
		e.api(ctx, http.MethodPost, "/v1/webhooks/registry", "", `{"events":[]}`, http.StatusUnauthorized, nil)
		e.api(ctx, http.MethodPost, "/v1/webhooks/registry", "Bearer "+svcSecret, `{garbage`, http.StatusBadRequest, nil)
		e.api(ctx, http.MethodGet, "/v1/operations", "", "", http.StatusUnauthorized, nil)
		if after := e.operations(ctx); after != before {
			t.Fatalf("bad input enqueued: %d operations, was %d", after, before)
		}
	})
}
