// Package testenv starts real registry processes and loopback HTTP helpers
// for tests: a distribution (docker-registry 2.8) instance with optional
// basic or bearer-token auth, and a counting, fault-injecting proxy.
//
// It is imported only by _test.go files. Every process it starts is stopped
// by PID in t.Cleanup, also when the test fails.
package testenv

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RegistryBinary is the distribution registry executable started by Registry.
var RegistryBinary = "/usr/bin/docker-registry"

// startTimeout bounds how long Registry waits for /v2/ to answer.
const startTimeout = 20 * time.Second

// RegistryOptions configures a test registry. The zero value is an
// anonymous, read-write registry.
type RegistryOptions struct {
	// Htpasswd maps user names to passwords. Without Token, the registry
	// requires HTTP basic auth against an htpasswd file made from it (bcrypt,
	// by the htpasswd tool). With Token, the token server checks these
	// credentials instead.
	Htpasswd map[string]string
	// Token turns on bearer-token auth: an in-process token server signs
	// ES256 JWTs (x5c header with a self-signed certificate that is the
	// registry's rootcertbundle). When Htpasswd is set, only those users get
	// the scopes they ask for; anonymous requests get no access. When
	// Htpasswd is empty, everyone gets every scope asked for.
	Token bool
	// Notifications are the registry's notification endpoints
	// (notifications.endpoints): it POSTs event envelopes to each.
	Notifications []NotificationEndpoint
	// RedirectBlobs makes the registry answer blob reads with a redirect
	// to a BlobStorage serving its storage (Reg.Storage), as registries
	// backed by object storage or a CDN do.
	RedirectBlobs bool
}

// NotificationEndpoint is one entry of the registry's
// notifications.endpoints. Pull events are not sent.
type NotificationEndpoint struct {
	// Name identifies the endpoint in the registry's logs; default "streamer".
	Name string
	// URL receives the POSTs.
	URL string
	// Headers are sent with every POST (e.g. Authorization).
	Headers map[string]string
	// Timeout bounds one POST (default 2s); Backoff is the delay before a
	// retry after a failure (default 200ms).
	Timeout, Backoff time.Duration
}

// notificationsYAML renders eps as the registry config's notifications
// section ("" for none). Values are quoted as JSON strings, valid YAML.
func notificationsYAML(eps []NotificationEndpoint) string {
	if len(eps) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("notifications:\n  endpoints:\n")
	for i, ep := range eps {
		name := ep.Name
		if name == "" {
			name = fmt.Sprintf("streamer-%d", i)
		}
		timeout, backoff := ep.Timeout, ep.Backoff
		if timeout <= 0 {
			timeout = 2 * time.Second
		}
		if backoff <= 0 {
			backoff = 200 * time.Millisecond
		}
		fmt.Fprintf(&b, "    - name: %q\n      url: %q\n      timeout: %s\n      threshold: 3\n      backoff: %s\n      ignore:\n        actions: [pull]\n", name, ep.URL, timeout, backoff)
		if len(ep.Headers) > 0 {
			keys := make([]string, 0, len(ep.Headers))
			for k := range ep.Headers {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			b.WriteString("      headers:\n")
			for _, k := range keys {
				fmt.Fprintf(&b, "        %q: [%q]\n", k, ep.Headers[k])
			}
		}
	}
	return b.String()
}

// Reg is a running docker-registry on 127.0.0.1.
type Reg struct {
	// Host is "127.0.0.1:PORT", usable as the host of an image reference.
	Host string
	// URL is "http://127.0.0.1:PORT".
	URL string
	// Dir is the registry's storage root directory.
	Dir string
	// TokenURL is the token server's URL (only with RegistryOptions.Token).
	TokenURL string
	// Storage serves the blob reads the registry redirects (only with
	// RegistryOptions.RedirectBlobs).
	Storage *BlobStorage

	t       testing.TB
	cfgPath string
	logPath string
	token   *tokenServer

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// Registry starts docker-registry on a free loopback port with storage under
// t.TempDir(), waits until /v2/ answers and stops it in t.Cleanup. Its
// output goes to a log file whose tail is printed if the test fails.
func Registry(t testing.TB, opts RegistryOptions) *Reg {
	t.Helper()
	if _, err := os.Stat(RegistryBinary); err != nil {
		t.Skipf("SKIP: registry binary %s not installed: %v", RegistryBinary, err)
	}
	base := t.TempDir()
	r := &Reg{
		t:       t,
		Dir:     filepath.Join(base, "storage"),
		cfgPath: filepath.Join(base, "config.yml"),
		logPath: filepath.Join(base, "registry.log"),
	}
	if err := os.MkdirAll(r.Dir, 0o755); err != nil {
		t.Fatalf("testenv: create registry storage: %v", err)
	}
	port, err := freePort()
	if err != nil {
		t.Fatalf("testenv: pick registry port: %v", err)
	}
	r.Host = fmt.Sprintf("127.0.0.1:%d", port)
	r.URL = "http://" + r.Host

	var auth string
	switch {
	case opts.Token:
		ts, err := startTokenServer(t, base, opts.Htpasswd)
		if err != nil {
			t.Fatalf("testenv: start token server: %v", err)
		}
		r.token = ts
		r.TokenURL = ts.srv.URL
		auth = fmt.Sprintf(`auth:
  token:
    realm: %s/token
    service: %s
    issuer: %s
    rootcertbundle: %s
`, ts.srv.URL, TokenService, TokenIssuer, ts.certPath)
	case len(opts.Htpasswd) > 0:
		path := filepath.Join(base, "htpasswd")
		if err := writeHtpasswd(path, opts.Htpasswd); err != nil {
			t.Fatalf("testenv: %v", err)
		}
		auth = fmt.Sprintf(`auth:
  htpasswd:
    realm: streamer-test
    path: %s
`, path)
	}
	middleware := ""
	if opts.RedirectBlobs {
		r.Storage = StartBlobStorage(t, r.Dir)
		middleware = RedirectYAML(r.Storage.BaseURL)
	}
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
  secret: streamer-testenv-secret
  headers:
    X-Content-Type-Options: [nosniff]
%s%s%s`, r.Dir, r.Host, auth, notificationsYAML(opts.Notifications), middleware)
	if err := os.WriteFile(r.cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatalf("testenv: write registry config: %v", err)
	}
	t.Cleanup(func() {
		r.stop()
		if t.Failed() {
			t.Logf("testenv: registry %s log tail (%s):\n%s", r.Host, r.logPath, tail(r.logPath, 40))
		}
	})
	r.Start()
	return r
}

// Start starts the registry again (after Stop) on the same port and storage
// and waits until it answers. It is a no-op while the registry runs.
func (r *Reg) Start() {
	r.t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd != nil {
		return
	}
	logf, err := os.OpenFile(r.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		r.t.Fatalf("testenv: open registry log: %v", err)
	}
	cmd := exec.Command(RegistryBinary, "serve", r.cfgPath)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// The registry must not outlive a test binary that crashes.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		r.t.Fatalf("testenv: start %s: %v", RegistryBinary, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	r.cmd, r.done = cmd, done
	if err := waitReady(r.URL, done); err != nil {
		r.stopLocked()
		r.t.Fatalf("testenv: registry %s did not start: %v\nlog tail:\n%s", r.Host, err, tail(r.logPath, 40))
	}
}

// Stop kills the registry process (for registry-down tests). Start brings it
// back. Stop is idempotent.
func (r *Reg) Stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopLocked()
}

func (r *Reg) stop() { r.Stop() }

func (r *Reg) stopLocked() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		r.t.Errorf("testenv: registry pid %d did not exit after SIGKILL", r.cmd.Process.Pid)
	}
	r.cmd, r.done = nil, nil
}

// Running reports whether the registry process is running.
func (r *Reg) Running() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cmd != nil
}

// LogPath is the file receiving the registry's output.
func (r *Reg) LogPath() string { return r.logPath }

// TokenRequests counts requests the token server answered (0 without Token).
func (r *Reg) TokenRequests() int64 {
	if r.token == nil {
		return 0
	}
	return r.token.requests.Load()
}

// Ref returns "Host/repo" plus suffix (":tag" or "@digest"), for building
// image references in tests.
func (r *Reg) Ref(repo, suffix string) string { return r.Host + "/" + repo + suffix }

func waitReady(url string, exited <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url+"/v2/", nil)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return nil
			}
			last = fmt.Errorf("GET /v2/: %s", resp.Status)
		} else {
			last = err
		}
		select {
		case <-exited:
			return errors.New("registry process exited")
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func writeHtpasswd(path string, users map[string]string) error {
	names := make([]string, 0, len(users))
	for u := range users {
		names = append(names, u)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	for _, u := range names {
		// -B bcrypt (the only scheme distribution accepts), -C 4 the
		// cheapest cost: tests need speed, not strength.
		out, err := exec.Command("htpasswd", "-nbB", "-C", "4", u, users[u]).Output()
		if err != nil {
			return fmt.Errorf("htpasswd for user %q: %w", u, err)
		}
		buf.Write(bytes.TrimSpace(out))
		buf.WriteByte('\n')
	}
	return os.WriteFile(path, buf.Bytes(), 0o600)
}

func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

// RedirectYAML is docker-registry's configuration for redirecting blob
// reads to base (its redirect storage middleware): a BlobStorage serving
// the registry's storage directory there.
func RedirectYAML(base string) string {
	return fmt.Sprintf(`middleware:
  storage:
    - name: redirect
      options:
        baseurl: %s
`, base)
}
