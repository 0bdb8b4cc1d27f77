package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net"
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

// Fault is one way a registry misbehaves on blob GETs (/v2/<name>/blobs/<d>).
// Requests for manifests, tokens and uploads always pass through untouched,
// so a fault hits the data path only.
type Fault int

// Faults a FaultProxy injects. Each is described by what the client sees.
const (
	// FaultNone passes every request through.
	FaultNone Fault = iota
	// FaultStatus answers Count blob GETs with Status (500, 502, 503...),
	// then passes them through.
	FaultStatus
	// FaultRetryAfter answers Count blob GETs with 429 and a Retry-After of
	// RetryAfter (whole seconds), then passes them through.
	FaultRetryAfter
	// FaultResetMidBody sends the headers and the first half of the body of
	// Count blob responses, then resets the connection (RST).
	FaultResetMidBody
	// FaultStall accepts blob GETs and never answers a byte until the
	// client gives up (or the fault is cleared).
	FaultStall
	// FaultTrickle sends blob bodies at Rate bytes per second.
	FaultTrickle
	// FaultWhole200 drops the Range header: the registry answers 200 with
	// the whole blob.
	FaultWhole200
	// FaultWrongContentRange answers 206 whose Content-Range (and body) is
	// shifted by Shift bytes from the range asked for.
	FaultWrongContentRange
	// FaultShortBody answers with the registry's headers but only half the
	// body, then closes the connection cleanly (FIN).
	FaultShortBody
	// FaultRedirectLoop answers every blob GET with a 307 to itself.
	FaultRedirectLoop
	// FaultChangedBlob serves the blob's bytes XORed with 0x5a: the blob
	// has changed under its digest since the artifact was made.
	FaultChangedBlob
	// FaultExpireTokens answers 401 (with the registry's own challenge) to
	// every request whose Authorization header was seen before the fault
	// was set: the tokens the client holds have expired. A fresh token
	// passes.
	FaultExpireTokens
)

func (f Fault) String() string {
	names := [...]string{"none", "status", "retry-after", "reset-mid-body", "stall", "trickle", "whole-200",
		"wrong-content-range", "short-body", "redirect-loop", "changed-blob", "expire-tokens"}
	if int(f) < len(names) {
		return names[f]
	}
	return "fault-" + strconv.Itoa(int(f))
}

// FaultSpec is a fault with its parameters. Zero parameters take the
// defaults noted on each field.
type FaultSpec struct {
	Fault Fault
	// Count is how many blob GETs the fault hits before requests pass
	// through again; 0 is forever.
	Count int
	// Status for FaultStatus; default 503.
	Status int
	// RetryAfter for FaultRetryAfter; default 1s.
	RetryAfter time.Duration
	// Rate in bytes per second for FaultTrickle; default 64 KiB/s.
	Rate int
	// Shift for FaultWrongContentRange; default 1.
	Shift int64
	// Digest, if set, limits the fault to blob GETs of that digest.
	Digest string
}

// FaultProxy is a loopback HTTP reverse proxy in front of a registry that
// injects one fault at a time into blob GETs, and can refuse connections
// altogether. It keeps the client's Host header, like Proxy.
type FaultProxy struct {
	// Host is "127.0.0.1:PORT"; it stays the same across SetRefused.
	Host string
	// URL is "http://" + Host.
	URL string

	t      testing.TB
	target *url.URL
	rp     *httputil.ReverseProxy
	srv    *http.Server
	closed chan struct{} // closed when the proxy shuts down: releases stalls

	blobGets atomic.Int64
	faulted  atomic.Int64

	mu        sync.Mutex
	spec      FaultSpec
	hits      int                 // blob GETs hit by spec so far
	seenAuth  map[string]struct{} // Authorization values seen
	expired   map[string]struct{} // those that FaultExpireTokens refuses
	ln        net.Listener
	conns     map[net.Conn]struct{}
	refused   bool
	serveDone chan struct{}
}

// NewFaultProxy starts a fault proxy in front of target ("127.0.0.1:PORT"
// or an http:// URL) and stops it in t.Cleanup.
func NewFaultProxy(t testing.TB, target string) *FaultProxy {
	t.Helper()
	if !strings.Contains(target, "://") {
		target = "http://" + target
	}
	u, err := url.Parse(target)
	if err != nil {
		t.Fatalf("testenv: fault proxy target %q: %v", target, err)
	}
	p := &FaultProxy{
		t:        t,
		target:   u,
		closed:   make(chan struct{}),
		seenAuth: map[string]struct{}{},
		conns:    map[net.Conn]struct{}{},
	}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u)
			pr.Out.Host = pr.In.Host
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			http.Error(w, "testenv fault proxy: "+err.Error(), http.StatusBadGateway)
		},
	}
	p.srv = &http.Server{
		Handler:           http.HandlerFunc(p.serve),
		ReadHeaderTimeout: 10 * time.Second,
		ConnState: func(c net.Conn, s http.ConnState) {
			p.mu.Lock()
			defer p.mu.Unlock()
			switch s {
			case http.StateNew:
				p.conns[c] = struct{}{}
			case http.StateClosed, http.StateHijacked:
				delete(p.conns, c)
			}
		},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: fault proxy listen: %v", err)
	}
	p.Host = ln.Addr().String()
	p.URL = "http://" + p.Host
	p.startServing(ln)
	t.Cleanup(p.close)
	return p
}

func (p *FaultProxy) startServing(ln net.Listener) {
	done := make(chan struct{})
	p.ln, p.serveDone = ln, done
	go func() {
		defer close(done)
		_ = p.srv.Serve(ln)
	}()
}

func (p *FaultProxy) close() {
	close(p.closed)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = p.srv.Shutdown(ctx)
	_ = p.srv.Close()
}

// Set installs spec as the current fault (FaultSpec{} clears it) and
// restarts its hit count.
func (p *FaultProxy) Set(spec FaultSpec) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.spec, p.hits = spec, 0
	if spec.Fault == FaultExpireTokens {
		p.expired = p.seenAuth
		p.seenAuth = map[string]struct{}{}
	}
}

// Clear removes the current fault.
func (p *FaultProxy) Clear() { p.Set(FaultSpec{}) }

// SetRefused closes the proxy's listening socket and every open connection
// while refused is true, so that clients get "connection refused"; false
// listens again on the same port.
func (p *FaultProxy) SetRefused(refused bool) {
	p.t.Helper()
	p.mu.Lock()
	if refused == p.refused {
		p.mu.Unlock()
		return
	}
	p.refused = refused
	if refused {
		ln, done := p.ln, p.serveDone
		conns := make([]net.Conn, 0, len(p.conns))
		for c := range p.conns {
			conns = append(conns, c)
		}
		p.mu.Unlock()
		ln.Close()
		<-done
		for _, c := range conns {
			c.Close()
		}
		return
	}
	p.mu.Unlock()
	ln, err := net.Listen("tcp", p.Host)
	if err != nil {
		p.t.Fatalf("testenv: fault proxy listen again on %s: %v", p.Host, err)
	}
	p.mu.Lock()
	p.startServing(ln)
	p.mu.Unlock()
}

// BlobGets counts blob GETs received; Faulted those a fault was applied to.
func (p *FaultProxy) BlobGets() int64 { return p.blobGets.Load() }

// Faulted counts blob GETs (or, for FaultExpireTokens, requests) a fault
// was applied to.
func (p *FaultProxy) Faulted() int64 { return p.faulted.Load() }

// take decides whether the current fault applies to r and counts the hit.
func (p *FaultProxy) take(r *http.Request) FaultSpec {
	auth := r.Header.Get("Authorization")
	isBlob := r.Method == http.MethodGet && IsBlobPath(r.URL.Path)
	p.mu.Lock()
	defer p.mu.Unlock()
	spec := p.spec
	if spec.Fault == FaultExpireTokens {
		if _, old := p.expired[auth]; auth != "" && old {
			return spec
		}
		if auth != "" {
			p.seenAuth[auth] = struct{}{}
		}
		return FaultSpec{}
	}
	if auth != "" {
		p.seenAuth[auth] = struct{}{}
	}
	if !isBlob || spec.Fault == FaultNone {
		return FaultSpec{}
	}
	if spec.Digest != "" && !strings.HasSuffix(r.URL.Path, "/"+spec.Digest) {
		return FaultSpec{}
	}
	if spec.Count > 0 && p.hits >= spec.Count {
		return FaultSpec{}
	}
	p.hits++
	return spec
}

func (p *FaultProxy) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && IsBlobPath(r.URL.Path) {
		p.blobGets.Add(1)
	}
	spec := p.take(r)
	if spec.Fault != FaultNone {
		p.faulted.Add(1)
	}
	switch spec.Fault {
	case FaultNone:
		p.rp.ServeHTTP(w, r)
	case FaultStatus:
		code := spec.Status
		if code == 0 {
			code = http.StatusServiceUnavailable
		}
		http.Error(w, "testenv fault: "+http.StatusText(code), code)
	case FaultRetryAfter:
		ra := spec.RetryAfter
		if ra <= 0 {
			ra = time.Second
		}
		w.Header().Set("Retry-After", strconv.Itoa(int((ra+time.Second-1)/time.Second)))
		http.Error(w, "testenv fault: slow down", http.StatusTooManyRequests)
	case FaultStall:
		select {
		case <-r.Context().Done():
		case <-p.closed:
		}
	case FaultWhole200:
		r.Header.Del("Range")
		p.rp.ServeHTTP(w, r)
	case FaultRedirectLoop:
		http.Redirect(w, r, r.URL.Path+"?loop="+strconv.FormatInt(p.faulted.Load(), 10), http.StatusTemporaryRedirect)
	case FaultExpireTokens:
		// The registry's own challenge, as it answers a missing token.
		r.Header.Del("Authorization")
		p.rp.ServeHTTP(w, r)
	default:
		p.serveRewritten(w, r, spec)
	}
}

// serveRewritten fetches the registry's answer and sends it altered.
func (p *FaultProxy) serveRewritten(w http.ResponseWriter, r *http.Request, spec FaultSpec) {
	rec := httptest.NewRecorder()
	p.rp.ServeHTTP(rec, r)
	resp := rec.Result()
	body := rec.Body.Bytes()
	ok := resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent
	copyHeader := func() {
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
	}
	if !ok {
		copyHeader()
		w.WriteHeader(resp.StatusCode)
		w.Write(body)
		return
	}
	switch spec.Fault {
	case FaultTrickle:
		rate := spec.Rate
		if rate <= 0 {
			rate = 64 << 10
		}
		copyHeader()
		w.WriteHeader(resp.StatusCode)
		step := max(rate/20, 1) // 20 writes a second
		for len(body) > 0 {
			n := min(step, len(body))
			if _, err := w.Write(body[:n]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			body = body[n:]
			select {
			case <-time.After(50 * time.Millisecond):
			case <-r.Context().Done():
				return
			case <-p.closed:
				return
			}
		}
	case FaultChangedBlob:
		out := bytes.Clone(body)
		for i := range out {
			out[i] ^= 0x5a
		}
		copyHeader()
		w.WriteHeader(resp.StatusCode)
		w.Write(out)
	case FaultWrongContentRange:
		shift := spec.Shift
		if shift == 0 {
			shift = 1
		}
		first, last, total, err := parseRange(resp.Header.Get("Content-Range"))
		copyHeader()
		if err == nil {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%s", first+shift, last+shift, total))
		}
		w.WriteHeader(resp.StatusCode)
		w.Write(body)
	case FaultShortBody, FaultResetMidBody:
		hj, ok := w.(http.Hijacker)
		if !ok {
			http.Error(w, "testenv fault proxy: no hijacker", http.StatusInternalServerError)
			return
		}
		conn, buf, err := hj.Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		fmt.Fprintf(buf, "HTTP/1.1 %s\r\n", resp.Status)
		resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
		resp.Header.Set("Connection", "close")
		resp.Header.Write(buf)
		buf.WriteString("\r\n")
		buf.Write(body[:len(body)/2])
		buf.Flush()
		if spec.Fault == FaultResetMidBody {
			if tc, ok := conn.(*net.TCPConn); ok {
				tc.SetLinger(0) // close sends RST
			}
		}
	default:
		http.Error(w, "testenv fault proxy: unknown fault "+spec.Fault.String(), http.StatusInternalServerError)
	}
}

// parseRange splits "bytes first-last/total"; total is returned as text.
func parseRange(s string) (first, last int64, total string, err error) {
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return 0, 0, "", fmt.Errorf("content-range %q", s)
	}
	rng, total, ok := strings.Cut(rest, "/")
	a, b, ok2 := strings.Cut(rng, "-")
	if !ok || !ok2 {
		return 0, 0, "", fmt.Errorf("content-range %q", s)
	}
	if first, err = strconv.ParseInt(a, 10, 64); err != nil {
		return 0, 0, "", err
	}
	if last, err = strconv.ParseInt(b, 10, 64); err != nil {
		return 0, 0, "", err
	}
	return first, last, total, nil
}
