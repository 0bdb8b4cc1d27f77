package testenv

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Proxy is a loopback HTTP reverse proxy in front of a registry that counts
// traffic and injects faults. It keeps the client's Host header, so URLs the
// registry builds (upload locations) point back at the proxy.
type Proxy struct {
	// Host is "127.0.0.1:PORT" of the proxy.
	Host string
	// URL is "http://" + Host.
	URL string

	srv          *httptest.Server
	requests     atomic.Int64
	blobRequests atomic.Int64
	blobBytes    atomic.Int64

	mu     sync.Mutex
	tamper func(path string, body []byte) []byte
	down   bool
	reset  bool
	rate   int64 // blob body bytes per second; 0: unlimited
	paths  []string
}

// CountingProxy starts a proxy in front of target ("127.0.0.1:PORT" or an
// http:// URL) and closes it in t.Cleanup.
func CountingProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	if !strings.Contains(target, "://") {
		target = "http://" + target
	}
	u, err := url.Parse(target)
	if err != nil {
		t.Fatalf("testenv: proxy target %q: %v", target, err)
	}
	p := &Proxy{}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u)
			pr.Out.Host = pr.In.Host
		},
		ModifyResponse: p.modify,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			http.Error(w, "testenv proxy: "+err.Error(), http.StatusBadGateway)
		},
	}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.requests.Add(1)
		p.mu.Lock()
		down, reset := p.down, p.reset
		p.paths = append(p.paths, r.Method+" "+r.URL.Path)
		p.mu.Unlock()
		if reset {
			if hj, ok := w.(http.Hijacker); ok {
				if conn, _, err := hj.Hijack(); err == nil {
					conn.Close()
					return
				}
			}
		}
		if down {
			http.Error(w, "testenv proxy: down", http.StatusServiceUnavailable)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(p.srv.Close)
	p.URL = p.srv.URL
	p.Host = strings.TrimPrefix(p.srv.URL, "http://")
	return p
}

// IsBlobPath reports whether an URL path is a blob GET target
// (/v2/<name>/blobs/<digest>, not an upload).
func IsBlobPath(path string) bool {
	return strings.HasPrefix(path, "/v2/") && strings.Contains(path, "/blobs/") && !strings.Contains(path, "/blobs/uploads")
}

func (p *Proxy) modify(resp *http.Response) error {
	r := resp.Request
	if r.Method != http.MethodGet || !IsBlobPath(r.URL.Path) ||
		(resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent) {
		return nil
	}
	p.blobRequests.Add(1)
	p.mu.Lock()
	tamper := p.tamper
	p.mu.Unlock()
	if tamper != nil {
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		body = tamper(r.URL.Path, body)
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resp.ContentLength = int64(len(body))
		resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
	}
	p.mu.Lock()
	rate := p.rate
	p.mu.Unlock()
	resp.Body = &countingBody{ReadCloser: resp.Body, n: &p.blobBytes, rate: rate, start: time.Now()}
	return nil
}

// countingBody counts a blob body's bytes and, with a rate, paces them.
type countingBody struct {
	io.ReadCloser
	n     *atomic.Int64
	rate  int64
	start time.Time
	sent  int64
}

func (c *countingBody) Read(b []byte) (int, error) {
	if c.rate > 0 && int64(len(b)) > c.rate/10 {
		b = b[:max(c.rate/10, 1)]
	}
	n, err := c.ReadCloser.Read(b)
	c.n.Add(int64(n))
	if c.rate > 0 {
		c.sent += int64(n)
		due := c.start.Add(time.Duration(float64(c.sent) / float64(c.rate) * float64(time.Second)))
		time.Sleep(time.Until(due))
	}
	return n, err
}

// SetRate limits each blob response body to bytesPerSecond (a slow link);
// 0 removes the limit. It applies to responses that start afterwards.
func (p *Proxy) SetRate(bytesPerSecond int64) {
	p.mu.Lock()
	p.rate = bytesPerSecond
	p.mu.Unlock()
}

// SetTamper installs fn to rewrite every blob response body (GET of
// /v2/.../blobs/...); nil removes it. Content-Length follows the new body.
func (p *Proxy) SetTamper(fn func(path string, body []byte) []byte) {
	p.mu.Lock()
	p.tamper = fn
	p.mu.Unlock()
}

// SetDown makes the proxy answer every request with 503 while down is true.
func (p *Proxy) SetDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
}

// SetReset makes the proxy close every connection without answering while
// reset is true (a connection reset for the client).
func (p *Proxy) SetReset(reset bool) {
	p.mu.Lock()
	p.reset = reset
	p.mu.Unlock()
}

// BlobBytes is the number of blob response body bytes sent to clients.
func (p *Proxy) BlobBytes() int64 { return p.blobBytes.Load() }

// BlobRequests counts successful blob GET responses (200 or 206).
func (p *Proxy) BlobRequests() int64 { return p.blobRequests.Load() }

// Requests counts every request the proxy received.
func (p *Proxy) Requests() int64 { return p.requests.Load() }

// Paths returns "METHOD /path" of every request received, in order.
func (p *Proxy) Paths() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.paths...)
}

// ResetCounters zeroes the byte and request counters and the path log.
func (p *Proxy) ResetCounters() {
	p.requests.Store(0)
	p.blobRequests.Store(0)
	p.blobBytes.Store(0)
	p.mu.Lock()
	p.paths = nil
	p.mu.Unlock()
}
