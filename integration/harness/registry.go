package harness

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/streamer-dev/streamer/internal/testenv"
)

// Registry is a distribution registry (docker-registry) process on a
// loopback port, storing blobs under Root.
type Registry struct {
	// Host is "127.0.0.1:PORT".
	Host string
	// Root is the storage root directory.
	Root string
	proc *Process
}

// StartRegistry starts docker-registry with filesystem storage under dir
// and plain HTTP on a free loopback port; it is stopped on cleanup.
func StartRegistry(t TB, dir string) *Registry {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("registry dir: %v", err)
	}
	bin, err := lookPath("docker-registry", "registry")
	if err != nil {
		t.Fatalf("start registry: %v (install the Debian docker-registry package: make deps)", err)
	}
	var lastErr error
	for try := 0; try < 3; try++ {
		port, err := FreePort()
		if err != nil {
			t.Fatalf("%v", err)
		}
		r := &Registry{Host: fmt.Sprintf("127.0.0.1:%d", port), Root: filepath.Join(dir, "storage")}
		cfg := RegistryConfig(r.Root, r.Host)
		cfgPath := filepath.Join(dir, "config.yml")
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
			t.Fatalf("write registry config: %v", err)
		}
		r.proc, err = StartProcess(bin, filepath.Join(dir, "registry.log"), "serve", cfgPath)
		if err != nil {
			t.Fatalf("%v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		lastErr = WaitFor(ctx, r.proc, "registry "+r.Host, func(ctx context.Context) error {
			return httpOK(ctx, "http://"+r.Host+"/v2/")
		})
		cancel()
		if lastErr == nil {
			p := r.proc
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("registry log tail:\n%s", p.LogTail(20))
				}
				p.Stop(5 * time.Second)
			})
			return r
		}
		r.proc.Kill()
	}
	t.Fatalf("start registry: %v", lastErr)
	return nil
}

// Stop stops the registry (a registry that is down, for failure tests).
func (r *Registry) Stop() { r.proc.Stop(5 * time.Second) }

func lookPath(names ...string) (string, error) {
	var err error
	for _, n := range names {
		var p string
		if p, err = execLookPath(n); err == nil {
			return p, nil
		}
	}
	return "", err
}

func httpOK(ctx context.Context, u string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode >= 500 {
		return fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return nil
}

// PushOptions tunes Push.
type PushOptions struct {
	// Docker pushes Docker schema 2 manifests instead of OCI ones.
	Docker bool
	// Username and Password authenticate to the registry.
	Username, Password string
	// TLSVerify is false for the plain-HTTP loopback registries tests use.
	TLSVerify bool
}

// Push copies the layout's tag to docker://dest (HOST/repo:tag) with skopeo,
// all platforms included.
func Push(ctx context.Context, lay Layout, dest string, o PushOptions) error {
	args := []string{"--insecure-policy", "copy", "--all", "--retry-times", "0", fmt.Sprintf("--dest-tls-verify=%t", o.TLSVerify)}
	if o.Docker {
		args = append(args, "--format", "v2s2")
	}
	if o.Username != "" {
		args = append(args, "--dest-creds", o.Username+":"+o.Password)
	}
	args = append(args, lay.Ref(), "docker://"+dest)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if _, err := RunCommand(ctx, nil, "skopeo", args...); err != nil {
		return fmt.Errorf("push %s to %s: %w", lay.Ref(), dest, err)
	}
	return nil
}

// BuildAndPush writes images into a layout under dir and pushes it to
// HOST/repo:tag, failing t on error.
func BuildAndPush(t TB, dir, dest string, o PushOptions, images ...Image) Layout {
	t.Helper()
	tag := dest[strings.LastIndex(dest, ":")+1:]
	lay, err := WriteLayout(dir, tag, images...)
	if err != nil {
		t.Fatalf("build image %s: %v", dest, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := Push(ctx, lay, dest, o); err != nil {
		t.Fatalf("%v", err)
	}
	return lay
}

// CountingProxy is a reverse proxy in front of a registry that counts the
// blob bytes it serves (GET /v2/.../blobs/...), so tests can tell how much
// of an image a node fetched.
type CountingProxy struct {
	// Host is the proxy's "127.0.0.1:PORT".
	Host       string
	blobBytes  atomic.Int64
	blobReqs   atomic.Int64
	totalBytes atomic.Int64
	srv        *http.Server
	mu         sync.Mutex
	ranges     []Fetch
}

// Fetch is one blob GET the proxy served: which blob, the requested Range
// header ("" for the whole blob) and how many bytes were sent.
type Fetch struct {
	Blob  string
	Range string
	Bytes int64
}

// StartCountingProxy proxies to the registry at upstream ("HOST:PORT") and
// stops on cleanup.
func StartCountingProxy(t TB, upstream string) *CountingProxy {
	t.Helper()
	u := &url.URL{Scheme: "http", Host: upstream}
	rp := httputil.NewSingleHostReverseProxy(u)
	p := &CountingProxy{}
	rp.ModifyResponse = func(resp *http.Response) error {
		blob := resp.Request.Method == http.MethodGet && strings.Contains(resp.Request.URL.Path, "/blobs/sha256:")
		if blob {
			p.blobReqs.Add(1)
			p.mu.Lock()
			p.ranges = append(p.ranges, Fetch{Blob: resp.Request.URL.Path[strings.LastIndex(resp.Request.URL.Path, "/")+1:], Range: resp.Request.Header.Get("Range")})
			idx := len(p.ranges) - 1
			p.mu.Unlock()
			resp.Body = &countingBody{ReadCloser: resp.Body, blob: blob, p: p, idx: idx}
			return nil
		}
		resp.Body = &countingBody{ReadCloser: resp.Body, blob: blob, p: p, idx: -1}
		return nil
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("counting proxy: %v", err)
	}
	p.Host = l.Addr().String()
	p.srv = &http.Server{Handler: rp, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = p.srv.Serve(l) }()
	t.Cleanup(func() { _ = p.srv.Close() })
	return p
}

type countingBody struct {
	io.ReadCloser
	blob bool
	p    *CountingProxy
	idx  int
}

func (b *countingBody) Read(buf []byte) (int, error) {
	n, err := b.ReadCloser.Read(buf)
	b.p.totalBytes.Add(int64(n))
	if b.blob {
		b.p.blobBytes.Add(int64(n))
		b.p.mu.Lock()
		if b.idx >= 0 && b.idx < len(b.p.ranges) {
			b.p.ranges[b.idx].Bytes += int64(n)
		}
		b.p.mu.Unlock()
	}
	return n, err
}

// Fetches returns the blob GETs served since the last Reset, in order.
func (p *CountingProxy) Fetches() []Fetch {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Fetch(nil), p.ranges...)
}

// BlobBytes is how many blob bytes the proxy has served.
func (p *CountingProxy) BlobBytes() int64 { return p.blobBytes.Load() }

// BlobRequests is how many blob GETs the proxy has seen.
func (p *CountingProxy) BlobRequests() int64 { return p.blobReqs.Load() }

// TotalBytes is how many response body bytes the proxy has served.
func (p *CountingProxy) TotalBytes() int64 { return p.totalBytes.Load() }

// Reset zeroes the counters.
func (p *CountingProxy) Reset() {
	p.blobBytes.Store(0)
	p.blobReqs.Store(0)
	p.totalBytes.Store(0)
	p.mu.Lock()
	p.ranges = nil
	p.mu.Unlock()
}

// BlobPath is where distribution's filesystem storage under root keeps the
// blob d (for tests that corrupt a blob behind the registry's back).
func BlobPath(root string, d fmt.Stringer) string {
	s := d.String()
	hex := s[strings.IndexByte(s, ':')+1:]
	return filepath.Join(root, "docker", "registry", "v2", "blobs", "sha256", hex[:2], hex, "data")
}

// TagExists reports whether distribution's storage under root has repo:tag.
func TagExists(root, repo, tag string) bool {
	_, err := os.Stat(filepath.Join(root, "docker", "registry", "v2", "repositories", repo, "_manifests", "tags", tag, "current", "link"))
	return err == nil
}

// Tags lists repo's tags in distribution's storage under root.
func Tags(root, repo string) []string {
	ents, _ := os.ReadDir(filepath.Join(root, "docker", "registry", "v2", "repositories", repo, "_manifests", "tags"))
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// RegistryConfig is the distribution registry configuration every
// registry of the harness and the benchmark runs with: storage under root
// (deletes allowed), listening on addr, quiet logs. With a redirect base
// URL, blob reads are redirected there (to a testenv.BlobStorage serving
// root), as registries backed by object storage or a CDN do.
func RegistryConfig(root, addr string, redirect ...string) string {
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
  secret: streamer-test-secret
`, root, addr)
	if len(redirect) > 0 && redirect[0] != "" {
		cfg += testenv.RedirectYAML(redirect[0])
	}
	return cfg
}
