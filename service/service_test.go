package service

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/converter"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/internal/testenv"
)

const (
	testToken  = "api-token"
	testSecret = "hook-secret"
)

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestStateTransitions(t *testing.T) {
	all := []State{Queued, Running, Succeeded, Failed, Canceled}
	legal := map[[2]State]bool{
		{Queued, Running}: true, {Queued, Canceled}: true,
		{Running, Succeeded}: true, {Running, Failed}: true, {Running, Canceled}: true, {Running, Queued}: true,
	}
	for _, from := range all {
		for _, to := range all {
			if got := from.CanMove(to); got != legal[[2]State{from, to}] {
				t.Errorf("%s -> %s: CanMove %t", from, to, got)
			}
		}
	}
	op := &Operation{ID: "x", State: Queued}
	now := time.Now()
	if err := op.move(Running, now); err != nil || op.Attempts != 1 || op.Started == nil {
		t.Fatalf("queued -> running: %v %+v", err, op)
	}
	if err := op.move(Succeeded, now); err != nil || op.Finished == nil {
		t.Fatalf("running -> succeeded: %v", err)
	}
	if err := op.move(Canceled, now); !errors.Is(err, ErrConflict) {
		t.Fatalf("succeeded -> canceled: %v, want ErrConflict", err)
	}
}

func TestNewIDUnique(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		id, err := newID()
		if err != nil {
			t.Fatal(err)
		}
		if seen[id] || len(id) != 22 || strings.ContainsAny(id, "+/=") {
			t.Fatalf("bad or repeated id %q", id)
		}
		seen[id] = true
	}
}

func TestStoreDurable(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromString("img")
	op := &Operation{ID: "a", Image: "h/r:t", Repository: "h/r", Digest: d, State: Queued, Created: time.Now()}
	if _, created, err := st.Insert(op, nil); err != nil || !created {
		t.Fatalf("insert: %v %t", err, created)
	}
	dup := &Operation{ID: "b", Image: "h/r:t2", Repository: "h/r", Digest: d, State: Queued, Created: time.Now()}
	got, created, err := st.Insert(dup, func(cur *Operation) bool { return cur.State.Active() })
	if err != nil || created || got.ID != "a" {
		t.Fatalf("duplicate insert: %v created=%t got %s", err, created, got.ID)
	}
	if _, err := st.Update("a", func(o *Operation) error { return o.move(Running, time.Now()) }); err != nil {
		t.Fatal(err)
	}
	if err := st.SetRepository(Repository{Name: "h/r", Streaming: true}); err != nil {
		t.Fatal(err)
	}
	st.Close()

	st, err = OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	got, err = st.LatestForImage("h/r@" + d.String())
	if err != nil || got.ID != "a" || got.State != Running {
		t.Fatalf("after reopen: %v %+v", err, got)
	}
	if _, err := st.Operation("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown op: %v", err)
	}
	if r, err := st.Repository("h/r"); err != nil || !r.Streaming {
		t.Fatalf("repository: %v %+v", err, r)
	}
	if r, err := st.Repository("h/other"); err != nil || r.Streaming {
		t.Fatalf("unknown repository: %v %+v", err, r)
	}
}

func TestNormalizeRepository(t *testing.T) {
	cases := []struct {
		in, want string
		ok       bool
	}{
		{"127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app", true},
		{"registry.example.com/app", "registry.example.com/app", true},
		{"app", "docker.io/library/app", true},
		{"127.0.0.1:5000/Team/App", "", false},
		{"127.0.0.1:5000/a//b", "", false},
		{"127.0.0.1:5000/-app", "", false},
		{"127.0.0.1:5000/app:tag", "", false},
		{"", "", false},
		{"127.0.0.1:5000/" + strings.Repeat("a", 300), "", false},
	}
	for _, tc := range cases {
		got, err := NormalizeRepository(tc.in)
		if tc.ok != (err == nil) || got != tc.want {
			t.Errorf("NormalizeRepository(%q) = %q, %v", tc.in, got, err)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("NormalizeRepository(%q): %v is not ErrInvalid", tc.in, err)
		}
	}
}

func pushEvent(host, repo, tag, mediaType string, d digest.Digest) Event {
	return Event{ID: "ev", Action: "push", Target: EventTarget{MediaType: mediaType, Digest: d, Repository: repo, Tag: tag, Size: 10}, Request: EventRequest{Host: host}}
}

func TestScreen(t *testing.T) {
	d := digest.FromString("m")
	cases := []struct {
		name   string
		ev     Event
		ignore string // substring of the reason; "" means accepted
	}{
		{"oci manifest by tag", pushEvent("h:1", "app", "v1", ocispec.MediaTypeImageManifest, d), ""},
		{"docker manifest by tag", pushEvent("h:1", "app", "v1", "application/vnd.docker.distribution.manifest.v2+json", d), ""},
		{"index by tag", pushEvent("h:1", "team/app", "v1", ocispec.MediaTypeImageIndex, d), ""},
		{"pull", func() Event {
			e := pushEvent("h:1", "app", "v1", ocispec.MediaTypeImageManifest, d)
			e.Action = "pull"
			return e
		}(), "action"},
		{"blob", pushEvent("h:1", "app", "", "application/octet-stream", d), "not an image manifest"},
		{"by digest", pushEvent("h:1", "app", "", ocispec.MediaTypeImageManifest, d), "by digest"},
		{"referrers tag index", pushEvent("h:1", "app", artifact.TagFallback(d), ocispec.MediaTypeImageIndex, d), "referrers tag"},
		{"streaming artifact", func() Event {
			e := pushEvent("h:1", "app", "v1", ocispec.MediaTypeImageManifest, d)
			e.Target.ArtifactType = artifact.ArtifactType
			return e
		}(), "streaming artifact"},
		{"bad digest", pushEvent("h:1", "app", "v1", ocispec.MediaTypeImageManifest, "sha256:zz"), "invalid digest"},
		{"no host", pushEvent("", "app", "v1", ocispec.MediaTypeImageManifest, d), "no registry host"},
		{"bad repository", pushEvent("h:1", "App", "v1", ocispec.MediaTypeImageManifest, d), "invalid repository"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ref, why := Screen(tc.ev, "")
			if tc.ignore == "" {
				if why != "" || ref.Digest != d || ref.Host != "h:1" {
					t.Fatalf("want accepted, got ref %v reason %q", ref, why)
				}
				return
			}
			if !strings.Contains(why, tc.ignore) {
				t.Fatalf("reason %q, want %q", why, tc.ignore)
			}
		})
	}
	if ref, why := Screen(pushEvent("inner:5000", "app", "v1", ocispec.MediaTypeImageManifest, d), "registry.example.com"); why != "" || ref.Host != "registry.example.com" {
		t.Fatalf("host override: %v %q", ref, why)
	}
}

func TestParseEnvelope(t *testing.T) {
	for _, bad := range []string{"", "garbage", "[]", `{"events": 3}`, `{"other": []}`, `{"events": [` + strings.Repeat(" ", MaxWebhookBody) + `]}`} {
		if _, err := ParseEnvelope(strings.NewReader(bad)); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseEnvelope(%.20q): %v, want ErrInvalid", bad, err)
		}
	}
	body := `{"events":[{"id":"1","timestamp":"2024-01-02T03:04:05Z","action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":5,"digest":"sha256:` + strings.Repeat("a", 64) + `","length":5,"repository":"app","url":"http://x/v2/app/manifests/sha256:aa","tag":"v1"},"request":{"id":"r","addr":"127.0.0.1:1","host":"127.0.0.1:5000","method":"PUT","useragent":"skopeo"},"actor":{},"source":{"addr":"x:5000","instanceID":"i"}}]}`
	env, err := ParseEnvelope(strings.NewReader(body))
	if err != nil || len(env.Events) != 1 || env.Events[0].Target.Tag != "v1" || env.Events[0].Request.Host != "127.0.0.1:5000" {
		t.Fatalf("ParseEnvelope: %v %+v", err, env)
	}
}

// pushImage pushes a one-layer image whose file holds content and returns
// its manifest descriptor.
func pushImage(t *testing.T, ctx context.Context, c *fetcher.Client, ref fetcher.Ref, content []byte) ocispec.Descriptor {
	t.Helper()
	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	if err := tw.WriteHeader(&tar.Header{Name: "data", Mode: 0o644, Size: int64(len(content)), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	tw.Write(content)
	tw.Close()
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(tarBuf.Bytes())
	zw.Close()
	layer := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(gz.Bytes()), Size: int64(gz.Len())}
	cfgBytes, _ := json.Marshal(ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.FromBytes(tarBuf.Bytes())}},
	})
	cfg := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfgBytes), Size: int64(len(cfgBytes))}
	for _, b := range []struct {
		d ocispec.Descriptor
		b []byte
	}{{layer, gz.Bytes()}, {cfg, cfgBytes}} {
		if err := c.PushBlob(ctx, ref, b.d, bytes.NewReader(b.b)); err != nil {
			t.Fatalf("push blob: %v", err)
		}
	}
	mb, _ := json.Marshal(ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: cfg, Layers: []ocispec.Descriptor{layer}})
	desc, err := c.PushManifest(ctx, ref, ocispec.MediaTypeImageManifest, mb, ref.Tag)
	if err != nil {
		t.Fatalf("push manifest: %v", err)
	}
	return desc
}

type fixture struct {
	reg    *testenv.Reg
	client *fetcher.Client
	svc    *Service
	srv    *httptest.Server
	api    *Client
	dir    string
}

func newFixture(t *testing.T, convert ConvertFunc) *fixture {
	t.Helper()
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c, err := fetcher.New(fetcher.Options{Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{reg: reg, client: c, dir: t.TempDir()}
	f.start(t, convert)
	return f
}

func (f *fixture) start(t *testing.T, convert ConvertFunc) {
	t.Helper()
	svc, err := New(Config{StateDir: f.dir, Workers: 2, Token: testToken, WebhookSecret: testSecret, Registry: f.client, Deleter: &RegistryDeleter{}, Convert: convert})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.svc = svc
	f.srv = httptest.NewServer(svc.Handler())
	f.api = &Client{URL: f.srv.URL, Token: testToken}
	t.Cleanup(f.stop)
}

func (f *fixture) stop() {
	if f.srv != nil {
		f.srv.Close()
		f.svc.Close()
		f.srv = nil
	}
}

func (f *fixture) wait(t *testing.T, ctx context.Context, id string, want State) *Operation {
	t.Helper()
	op, err := f.api.Wait(ctx, id, 20*time.Millisecond, nil)
	if err != nil {
		t.Fatalf("wait for %s: %v", id, err)
	}
	if op.State != want {
		t.Fatalf("operation %s is %s (error %q), want %s", id, op.State, op.Error, want)
	}
	return op
}

func TestAPIAuthAndBadInput(t *testing.T) {
	ctx := testCtx(t)
	f := newFixture(t, nil)
	post := func(path, auth, body string) int {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, f.srv.URL+path, strings.NewReader(body))
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	cases := []struct {
		name, path, auth, body string
		want                   int
	}{
		{"api without token", PathOperations, "", `{"image":"x"}`, 401},
		{"api wrong token", PathOperations, "Bearer nope", `{"image":"x"}`, 401},
		{"api with webhook secret", PathOperations, "Bearer " + testSecret, `{"image":"x"}`, 401},
		{"webhook without secret", PathWebhook, "", `{"events":[]}`, 401},
		{"webhook with api token", PathWebhook, "Bearer " + testToken, `{"events":[]}`, 401},
		{"webhook garbage", PathWebhook, "Bearer " + testSecret, `not json`, 400},
		{"webhook no events", PathWebhook, "Bearer " + testSecret, `{}`, 400},
		{"webhook ok", PathWebhook, "Bearer " + testSecret, `{"events":[]}`, 202},
		{"create garbage", PathOperations, "Bearer " + testToken, `{`, 400},
		{"create unknown field", PathOperations, "Bearer " + testToken, `{"img":"x"}`, 400},
		{"create bad reference", PathOperations, "Bearer " + testToken, `{"image":"UPPER/Case:x"}`, 400},
		{"create unknown image", PathOperations, "Bearer " + testToken, fmt.Sprintf(`{"image":%q}`, f.reg.Ref("nothing", ":here")), 404},
		{"cancel unknown", PathOperations + "/doesnotexist/cancel", "Bearer " + testToken, ``, 404},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := post(tc.path, tc.auth, tc.body); got != tc.want {
				t.Fatalf("POST %s: %d, want %d", tc.path, got, tc.want)
			}
		})
	}
	if _, err := f.api.Operation(ctx, "doesnotexist"); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown operation: %v", err)
	}
	if _, err := f.api.SetStreaming(ctx, f.reg.Host+"/Bad//Name", true); !errors.Is(err, ErrInvalid) {
		t.Errorf("bad repository name: %v", err)
	}
	if _, err := f.api.ForImage(ctx, f.reg.Ref("nothing", ":here")); !errors.Is(err, ErrNotFound) {
		t.Errorf("operations of an unknown image: %v", err)
	}
	ops, err := f.svc.Store().Operations(nil)
	if err != nil || len(ops) != 0 {
		t.Fatalf("bad input enqueued something: %v %d", err, len(ops))
	}
}

func TestCreateConvertsAndDeletes(t *testing.T) {
	ctx := testCtx(t)
	f := newFixture(t, nil)
	ref, _ := fetcher.ParseRef(f.reg.Ref("app", ":v1"))
	desc := pushImage(t, ctx, f.client, ref, []byte("hello"))
	op, created, err := f.api.Create(ctx, ref.String())
	if err != nil || !created || op.Digest != desc.Digest || op.State != Queued {
		t.Fatalf("create: %v created=%t %+v", err, created, op)
	}
	done := f.wait(t, ctx, op.ID, Succeeded)
	if done.Artifact == "" || len(done.Layers) != 1 || !done.Layers[0].Done || done.Finished == nil {
		t.Fatalf("succeeded operation lacks details: %+v", done)
	}
	refs, err := f.client.Referrers(ctx, ref, desc, artifact.ArtifactType)
	if err != nil || len(refs) != 1 || refs[0].Digest != done.Artifact {
		t.Fatalf("referrers: %v %v, want %s", err, refs, done.Artifact)
	}
	ops, err := f.api.ForImage(ctx, ref.String())
	if err != nil || ops[0].ID != op.ID {
		t.Fatalf("operations for image: %v %v", err, ops)
	}
	del, err := f.api.DeleteArtifacts(ctx, ref.String())
	if err != nil || len(del.Deleted) != 1 || del.Deleted[0] != done.Artifact {
		t.Fatalf("delete: %v %+v", err, del)
	}
	if refs, err := f.client.Referrers(ctx, ref, desc, artifact.ArtifactType); err != nil || len(refs) != 0 {
		t.Fatalf("referrers after delete: %v %v", err, refs)
	}
	if _, err := f.client.Resolve(ctx, ref); err != nil {
		t.Fatalf("image gone after delete: %v", err)
	}
	if _, err := f.api.DeleteArtifacts(ctx, ref.String()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v, want ErrNotFound", err)
	}
}

// blocking is a ConvertFunc that waits until its context ends or release
// is closed, counting calls.
type blocking struct {
	mu      sync.Mutex
	calls   int
	started chan string
	release chan struct{}
}

func newBlocking() *blocking {
	return &blocking{started: make(chan string, 16), release: make(chan struct{})}
}

func (b *blocking) convert(ctx context.Context, c *fetcher.Client, ref fetcher.Ref, opts converter.Options) ([]converter.Result, error) {
	b.mu.Lock()
	b.calls++
	b.mu.Unlock()
	b.started <- ref.String()
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-b.release:
		return []converter.Result{{Artifact: ocispec.Descriptor{Digest: digest.FromString(ref.String())}}}, nil
	}
}

func TestCancel(t *testing.T) {
	ctx := testCtx(t)
	b := newBlocking()
	f := newFixture(t, b.convert)
	ref, _ := fetcher.ParseRef(f.reg.Ref("app", ":v1"))
	pushImage(t, ctx, f.client, ref, []byte("one"))
	op, _, err := f.api.Create(ctx, ref.String())
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-b.started:
	case <-ctx.Done():
		t.Fatal("conversion never started")
	}
	if again, created, err := f.api.Create(ctx, ref.String()); err != nil || created || again.ID != op.ID {
		t.Fatalf("create while running: %v created=%t %s, want the running %s", err, created, again.ID, op.ID)
	}
	if _, err := f.api.Cancel(ctx, op.ID); err != nil {
		t.Fatal(err)
	}
	got := f.wait(t, ctx, op.ID, Canceled)
	if got.Artifact != "" || got.Finished == nil {
		t.Fatalf("canceled operation: %+v", got)
	}
	if _, err := f.api.Cancel(ctx, op.ID); !errors.Is(err, ErrConflict) {
		t.Fatalf("cancel of a canceled operation: %v, want ErrConflict", err)
	}
}

func TestCancelQueued(t *testing.T) {
	ctx := testCtx(t)
	b := newBlocking()
	f := newFixture(t, b.convert)
	var ids []string
	for i, repo := range []string{"a", "b", "c"} {
		ref, _ := fetcher.ParseRef(f.reg.Ref(repo, ":v1"))
		pushImage(t, ctx, f.client, ref, []byte{byte(i)})
		op, _, err := f.api.Create(ctx, ref.String())
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, op.ID)
	}
	// Two workers: the third waits in the queue.
	op, err := f.api.Cancel(ctx, ids[2])
	if err != nil || op.State != Canceled {
		t.Fatalf("cancel queued: %v %+v", err, op)
	}
	close(b.release)
	f.wait(t, ctx, ids[0], Succeeded)
	f.wait(t, ctx, ids[1], Succeeded)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.calls != 2 {
		t.Fatalf("%d conversions, want 2 (the canceled one never runs)", b.calls)
	}
}

func TestRestartRequeues(t *testing.T) {
	ctx := testCtx(t)
	b := newBlocking()
	f := newFixture(t, b.convert)
	var ids []string
	for i, repo := range []string{"a", "b", "c"} {
		ref, _ := fetcher.ParseRef(f.reg.Ref(repo, ":v1"))
		pushImage(t, ctx, f.client, ref, []byte{byte(i)})
		op, _, err := f.api.Create(ctx, ref.String())
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, op.ID)
	}
	for i := 0; i < 2; i++ {
		<-b.started
	}
	f.stop() // running ones stay "running" in the database, as after a crash
	if op, err := f.svc.Store().Operation(ids[0]); err == nil {
		t.Fatalf("store still open after stop: %+v", op)
	}
	b2 := newBlocking()
	close(b2.release)
	f.start(t, b2.convert)
	for _, id := range ids {
		op := f.wait(t, ctx, id, Succeeded)
		if id != ids[2] && op.Attempts != 2 {
			t.Errorf("operation %s: %d attempts, want 2", id, op.Attempts)
		}
	}
	b2.mu.Lock()
	defer b2.mu.Unlock()
	if b2.calls != 3 {
		t.Fatalf("%d conversions after restart, want 3", b2.calls)
	}
}

func TestWebhookAutoConversion(t *testing.T) {
	ctx := testCtx(t)
	f := newFixture(t, nil)
	ref, _ := fetcher.ParseRef(f.reg.Ref("team/app", ":v1"))
	desc := pushImage(t, ctx, f.client, ref, []byte("auto"))
	send := func(evs ...Event) WebhookResult {
		t.Helper()
		b, _ := json.Marshal(Envelope{Events: evs})
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, f.srv.URL+PathWebhook, bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+testSecret)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var res WebhookResult
		if resp.StatusCode != http.StatusAccepted || json.NewDecoder(resp.Body).Decode(&res) != nil {
			t.Fatalf("webhook: %s", resp.Status)
		}
		return res
	}
	ev := pushEvent(f.reg.Host, "team/app", "v1", desc.MediaType, desc.Digest)
	ev.Target.Size = desc.Size

	// Disabled (never enabled): ignored.
	if res := send(ev); res.Events[0].Operation != "" || !strings.Contains(res.Events[0].Ignored, "disabled") {
		t.Fatalf("disabled repository: %+v", res)
	}
	if _, err := f.api.SetStreaming(ctx, f.reg.Host+"/team/app", true); err != nil {
		t.Fatal(err)
	}
	res := send(ev, ev)
	if res.Events[0].Operation == "" || res.Events[1].Operation != "" || !strings.Contains(res.Events[1].Ignored, "duplicate") {
		t.Fatalf("enabled repository, twice: %+v", res)
	}
	op := f.wait(t, ctx, res.Events[0].Operation, Succeeded)
	if op.Source != SourceWebhook {
		t.Errorf("source %q", op.Source)
	}
	// Converted already: a re-push of the same manifest is a duplicate.
	if res := send(ev); res.Events[0].Operation != "" {
		t.Fatalf("re-push of a converted image queued %s", res.Events[0].Operation)
	}
	// The artifact itself, pushed by tag, is recognized by its manifest.
	arts, err := f.client.Referrers(ctx, ref, desc, artifact.ArtifactType)
	if err != nil || len(arts) != 1 {
		t.Fatalf("referrers: %v %v", err, arts)
	}
	artEv := pushEvent(f.reg.Host, "team/app", "art", ocispec.MediaTypeImageManifest, arts[0].Digest)
	artEv.Target.Size = arts[0].Size
	if res := send(artEv); !strings.Contains(res.Events[0].Ignored, "streaming artifact") {
		t.Fatalf("artifact push: %+v", res)
	}
	repo, err := f.api.Repository(ctx, f.reg.Host+"/team/app")
	if err != nil || !repo.Streaming || len(repo.Images) != 1 || repo.Images[0].Artifact != op.Artifact {
		t.Fatalf("repository: %v %+v", err, repo)
	}
	// Disabled again: new pushes are ignored, the converted image stays listed.
	if _, err := f.api.SetStreaming(ctx, f.reg.Host+"/team/app", false); err != nil {
		t.Fatal(err)
	}
	ref2, _ := fetcher.ParseRef(f.reg.Ref("team/app", ":v2"))
	desc2 := pushImage(t, ctx, f.client, ref2, []byte("later"))
	if res := send(pushEvent(f.reg.Host, "team/app", "v2", desc2.MediaType, desc2.Digest)); res.Events[0].Operation != "" {
		t.Fatalf("disabled repository queued %s", res.Events[0].Operation)
	}
	all, err := f.api.Repositories(ctx, true)
	if err != nil || len(all) != 1 || len(all[0].Images) != 1 {
		t.Fatalf("repositories: %v %+v", err, all)
	}
	if on, err := f.api.Repositories(ctx, false); err != nil || len(on) != 0 {
		t.Fatalf("enabled repositories: %v %+v", err, on)
	}
}
