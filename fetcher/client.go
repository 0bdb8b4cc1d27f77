// Package fetcher talks to OCI registries: it resolves references, fetches
// and pushes manifests and blobs, reads byte ranges of blobs (the hot path
// of lazy pulls), and finds streaming artifacts among an image's referrers.
//
// It is built on oras-go v2: registry/remote for the distribution API
// (resolve, push, mount, referrers with the tag-schema fallback),
// registry/remote/auth for basic and bearer-token auth with a token cache,
// registry/remote/retry for backoff on 408/429/5xx and transient network
// errors, and registry/remote/credentials for docker config files. Blob
// reads, range reads and manifest fetches are plain HTTP requests sent
// through the same auth client so that they verify exactly what Streamer
// needs and reuse connections and tokens.
package fetcher

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"oras.land/oras-go/v2/errdef"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/credentials"
	"oras.land/oras-go/v2/registry/remote/errcode"
	"oras.land/oras-go/v2/registry/remote/retry"
)

// Error kinds callers branch on (errors.Is). Each is wrapped together with
// the underlying error.
var (
	// ErrNotFound: the image, tag, manifest or blob does not exist.
	ErrNotFound = errors.New("not found")
	// ErrUnauthorized: the registry or its token server refused the
	// credentials (or their absence).
	ErrUnauthorized = errors.New("unauthorized")
	// ErrUnreachable: the registry could not be reached (connection refused,
	// DNS failure, timeout, connection reset).
	ErrUnreachable = errors.New("registry unreachable")
	// ErrUnsupportedMediaType: a manifest of a kind Streamer cannot use
	// (Docker schema 1, unknown artifact types).
	ErrUnsupportedMediaType = errors.New("unsupported media type")
	// ErrRangeMismatch: a range response does not hold the bytes asked for.
	ErrRangeMismatch = errors.New("range response mismatch")
	// ErrNotMounted: the registry answered a cross-repository mount with an
	// upload session; the caller must push the blob instead.
	ErrNotMounted = errors.New("blob not mounted")
	// ErrNoArtifact: the image has no streaming artifact.
	ErrNoArtifact = errors.New("no streaming artifact")
)

// Environment variables holding credentials when Options has none.
const (
	EnvUsername = "STREAMER_REGISTRY_USERNAME"
	EnvPassword = "STREAMER_REGISTRY_PASSWORD"
)

// Defaults for Options.
const (
	DefaultRetries   = 4
	DefaultTimeout   = 30 * time.Second
	DefaultUserAgent = "streamer"
	// MaxManifestBytes bounds every manifest this package reads.
	MaxManifestBytes = 4 << 20
)

// Options configures a Client. The zero value works: HTTPS with system
// roots, docker config credentials, 4 retries, 30 s timeouts.
type Options struct {
	// Insecure lists hosts ("host" or "host:port") reached with plain HTTP,
	// or with TLS without certificate verification. HTTPS is tried first
	// and the answer is cached per host. Loopback hosts (127.0.0.0/8,
	// localhost, ::1) are always treated as insecure, as Docker does.
	Insecure []string
	// CAFiles are PEM files with extra root certificates.
	CAFiles []string
	// DockerConfig is a docker config.json for credentials; default
	// $DOCKER_CONFIG/config.json or ~/.docker/config.json.
	DockerConfig string
	// Username and Password are explicit credentials for every registry;
	// else STREAMER_REGISTRY_USERNAME/STREAMER_REGISTRY_PASSWORD; else the
	// docker config.
	Username, Password string
	// HostCredentials are per-host credentials ("host" or "host:port"),
	// consulted before all of the above.
	HostCredentials map[string]Credential
	// Mirrors maps a registry host to mirror hosts tried first, in order,
	// for reads (resolve, manifests, blobs, range reads). Writes always go
	// to the registry itself.
	Mirrors map[string][]string
	// Retries is how many times a request is retried on 408, 429 (honouring
	// Retry-After), 5xx, timeouts and connection resets; default 4. Negative
	// disables retries.
	Retries int
	// Timeout bounds connecting, the wait for response headers of every
	// request, and each ReadRange call as a whole; default 30 s. Streaming
	// a blob body is bounded by the caller's context only.
	Timeout time.Duration
	// UserAgent is sent with every request; default "streamer".
	UserAgent string
	// LocationTTL is how long range reads of a blob go straight to the
	// storage location a registry redirected them to (blobLocations);
	// default DefaultLocationTTL, negative: every read asks the registry.
	LocationTTL time.Duration

	// backoff is the first retry delay (tests shorten it); default 250 ms.
	backoff time.Duration
}

// Client is a registry client. It is safe for concurrent use; share one per
// process so connections and tokens are reused.
type Client struct {
	opts     Options
	insecure map[string]bool
	http     *http.Client // retries, no auth: probes
	auth     *auth.Client // retries + auth: every registry request

	mu      sync.Mutex
	schemes map[string]string             // host -> "https" | "http"
	repos   map[string]*remote.Repository // "scheme://host/repo"
	badHost map[string]time.Time          // mirrors that failed recently

	locations blobLocations
	redirects atomic.Int64
}

// Redirects is how many range reads a registry redirected to a blob
// storage location that was then remembered (see blobLocations).
func (c *Client) Redirects() int64 { return c.redirects.Load() }

// blobLocations remembers, per registry host, repository and blob, where
// the registry redirected a range read of the blob (most registries send
// blob reads to object storage or a CDN, with a signed URL): later range
// reads of the blob go there directly for LocationTTL, instead of a round
// trip to the registry for a redirect each time, which on a distant
// registry doubles the latency of every on-demand read. A location that
// fails (expired signature, storage error) is forgotten and the registry
// asked again.
type blobLocations struct {
	ttl time.Duration
	mu  sync.Mutex
	m   map[string]blobLocation
}

type blobLocation struct {
	url     *url.URL
	expires time.Time
}

// DefaultLocationTTL is how long a blob's redirected location is used
// before the registry is asked again. Signed storage URLs of the common
// registries are valid for several minutes at least; a location that
// expires sooner fails and is asked for again anyway.
const DefaultLocationTTL = time.Minute

// maxLocations bounds the remembered locations (one per blob read).
const maxLocations = 4096

func (l *blobLocations) get(key string) (*url.URL, bool) {
	if l.ttl <= 0 {
		return nil, false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.m[key]
	if !ok {
		return nil, false
	}
	if time.Now().After(e.expires) {
		delete(l.m, key)
		return nil, false
	}
	return e.url, true
}

func (l *blobLocations) put(key string, u *url.URL) {
	if l.ttl <= 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string]blobLocation{}
	}
	now := time.Now()
	if len(l.m) >= maxLocations {
		for k, e := range l.m {
			if now.After(e.expires) {
				delete(l.m, k)
			}
		}
		if len(l.m) >= maxLocations {
			clear(l.m)
		}
	}
	l.m[key] = blobLocation{url: u, expires: now.Add(l.ttl)}
}

// forget drops key's location if it is still u.
func (l *blobLocations) forget(key string, u *url.URL) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.m[key]; ok && e.url == u {
		delete(l.m, key)
	}
}

// New returns a Client for opts.
func New(opts Options) (*Client, error) {
	if opts.Retries == 0 {
		opts.Retries = DefaultRetries
	} else if opts.Retries < 0 {
		opts.Retries = 0
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.UserAgent == "" {
		opts.UserAgent = DefaultUserAgent
	}
	if opts.backoff <= 0 {
		opts.backoff = 250 * time.Millisecond
	}
	if opts.LocationTTL == 0 {
		opts.LocationTTL = DefaultLocationTTL
	}
	c := &Client{
		opts:     opts,
		insecure: map[string]bool{},
		schemes:  map[string]string{},
		repos:    map[string]*remote.Repository{},
		badHost:  map[string]time.Time{},
	}
	c.locations.ttl = opts.LocationTTL
	for _, h := range opts.Insecure {
		c.insecure[h] = true
	}

	roots, err := x509.SystemCertPool()
	if err != nil || roots == nil {
		roots = x509.NewCertPool()
	}
	for _, f := range opts.CAFiles {
		pem, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("read CA file: %w", err)
		}
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("read CA file %s: no PEM certificates", f)
		}
	}
	newTransport := func(tlsConf *tls.Config) *http.Transport {
		return &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           (&net.Dialer{Timeout: opts.Timeout, KeepAlive: 30 * time.Second}).DialContext,
			TLSClientConfig:       tlsConf,
			TLSHandshakeTimeout:   opts.Timeout,
			ResponseHeaderTimeout: opts.Timeout,
			ExpectContinueTimeout: time.Second,
			ForceAttemptHTTP2:     true,
			// Lazy pulls issue many concurrent range reads to one host.
			MaxIdleConns:        256,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
		}
	}
	rt := &hostTransport{
		secure:     newTransport(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}),
		insecure:   newTransport(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12, InsecureSkipVerify: true}), //nolint:gosec // only for hosts the operator marked insecure, or loopback
		isInsecure: c.isInsecure,
		userAgent:  opts.UserAgent,
	}
	policy := &retry.GenericPolicy{
		Retryable: retryable,
		Backoff:   retry.ExponentialBackoff(opts.backoff, 2, 0.1),
		MinWait:   opts.backoff,
		MaxWait:   5 * time.Second,
		MaxRetry:  opts.Retries,
	}
	c.http = &http.Client{Transport: &retry.Transport{Base: rt, Policy: func() retry.Policy { return policy }}}

	cred, err := c.credentialFunc()
	if err != nil {
		return nil, err
	}
	c.auth = &auth.Client{
		Client:     c.http,
		Header:     http.Header{"User-Agent": {opts.UserAgent}},
		Credential: cred,
		Cache:      auth.NewCache(),
		ClientID:   "streamer",
	}
	return c, nil
}

// Credential is a username and password (or identity token) for a registry.
type Credential struct{ Username, Password string }

func (c *Client) credentialFunc() (auth.CredentialFunc, error) {
	fallback, err := c.defaultCredentialFunc()
	if err != nil || len(c.opts.HostCredentials) == 0 {
		return fallback, err
	}
	return func(ctx context.Context, host string) (auth.Credential, error) {
		if cr, ok := c.opts.HostCredentials[host]; ok {
			return auth.Credential{Username: cr.Username, Password: cr.Password}, nil
		}
		if fallback == nil {
			return auth.EmptyCredential, nil
		}
		return fallback(ctx, host)
	}, nil
}

func (c *Client) defaultCredentialFunc() (auth.CredentialFunc, error) {
	user, pass := c.opts.Username, c.opts.Password
	if user == "" && pass == "" {
		user, pass = os.Getenv(EnvUsername), os.Getenv(EnvPassword)
	}
	if user != "" || pass != "" {
		// Unlike auth.StaticCredential (one host), explicit credentials
		// apply to every registry and mirror this client talks to.
		cred := auth.Credential{Username: user, Password: pass}
		return func(context.Context, string) (auth.Credential, error) { return cred, nil }, nil
	}
	var (
		store *credentials.DynamicStore
		err   error
	)
	if c.opts.DockerConfig != "" {
		store, err = credentials.NewStore(c.opts.DockerConfig, credentials.StoreOptions{})
	} else {
		store, err = credentials.NewStoreFromDocker(credentials.StoreOptions{})
	}
	if err != nil {
		if c.opts.DockerConfig != "" {
			return nil, fmt.Errorf("load docker config credentials: %w", err)
		}
		// No usable default docker config (no $HOME): anonymous access.
		log.L.WithError(err).Warn("docker config not loaded, registry access is anonymous")
		return nil, nil
	}
	return credentials.Credential(store), nil
}

// hostTransport sends requests for insecure hosts through a transport that
// skips TLS verification, and sets the User-Agent.
type hostTransport struct {
	secure, insecure *http.Transport
	isInsecure       func(host string) bool
	userAgent        string
}

func (t *hostTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Header.Get("User-Agent") == "" {
		req = req.Clone(req.Context())
		req.Header.Set("User-Agent", t.userAgent)
	}
	if req.URL.Scheme == "https" && t.isInsecure(req.URL.Host) {
		return t.insecure.RoundTrip(req)
	}
	return t.secure.RoundTrip(req)
}

// isInsecure reports whether host may use plain HTTP or unverified TLS.
func (c *Client) isInsecure(host string) bool {
	if c.insecure[host] {
		return true
	}
	h := host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		h = hh
	}
	if c.insecure[h] {
		return true
	}
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(strings.Trim(h, "[]"))
	return ip != nil && ip.IsLoopback()
}

// retryable is the retry predicate: 408, 429, 5xx (but 501/505), timeouts
// and connections reset or closed mid-request.
func retryable(resp *http.Response, err error) (bool, error) {
	if err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return false, err
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return true, nil
		}
		if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
			errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return true, nil
		}
		return false, err
	}
	switch resp.StatusCode {
	case http.StatusRequestTimeout, http.StatusTooManyRequests:
		return true, nil
	case http.StatusNotImplemented, http.StatusHTTPVersionNotSupported:
		return false, nil
	}
	return resp.StatusCode >= 500, nil
}

// scheme returns "https" or "http" for host. Secure hosts always use HTTPS.
// Insecure and loopback hosts are probed once with HTTPS (unverified) and
// fall back to plain HTTP when the server does not speak TLS; the answer is
// cached. An unreachable host is not cached.
func (c *Client) scheme(ctx context.Context, host string) (string, error) {
	if !c.isInsecure(host) {
		return "https", nil
	}
	c.mu.Lock()
	s, ok := c.schemes[host]
	c.mu.Unlock()
	if ok {
		return s, nil
	}
	pctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(pctx, http.MethodGet, "https://"+host+"/v2/", nil)
	if err != nil {
		return "", err
	}
	// The base transport, not c.http: a probe is not worth retries.
	resp, err := c.http.Transport.(*retry.Transport).Base.RoundTrip(req)
	switch {
	case err == nil:
		resp.Body.Close()
		s = "https"
	case ctx.Err() != nil:
		return "", ctx.Err()
	case isDialError(err):
		return "", fmt.Errorf("probe %s: %w: %w", host, ErrUnreachable, err)
	default:
		// TLS refused ("server gave HTTP response to HTTPS client",
		// handshake failure): the registry speaks plain HTTP.
		s = "http"
	}
	log.G(ctx).WithFields(log.Fields{"host": host, "scheme": s}).Debug("registry scheme probed")
	c.mu.Lock()
	c.schemes[host] = s
	c.mu.Unlock()
	return s, nil
}

func isDialError(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	var dns *net.DNSError
	if errors.As(err, &dns) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.ECONNREFUSED)
}

// repository returns the oras repository for host/repo, created once.
func (c *Client) repository(ctx context.Context, host, repo string) (*remote.Repository, error) {
	s, err := c.scheme(ctx, host)
	if err != nil {
		return nil, err
	}
	key := s + "://" + host + "/" + repo
	c.mu.Lock()
	defer c.mu.Unlock()
	if r, ok := c.repos[key]; ok {
		return r, nil
	}
	ref := registry.Reference{Registry: host, Repository: repo}
	if err := ref.ValidateRepository(); err != nil {
		return nil, fmt.Errorf("repository %s/%s: %w", host, repo, err)
	}
	r := &remote.Repository{
		Client:           c.auth,
		Reference:        ref,
		PlainHTTP:        s == "http",
		MaxMetadataBytes: MaxManifestBytes,
		// Old referrers tag indexes are left behind rather than deleted:
		// registries may refuse deletes, and a stale index is harmless.
		SkipReferrersGC: true,
	}
	c.repos[key] = r
	return r, nil
}

// readHosts returns the hosts to try for reads from host: healthy mirrors
// first, then host itself.
func (c *Client) readHosts(host string) []string {
	mirrors := c.opts.Mirrors[host]
	if len(mirrors) == 0 {
		return []string{host}
	}
	hosts := make([]string, 0, len(mirrors)+1)
	now := time.Now()
	c.mu.Lock()
	for _, m := range mirrors {
		if t, bad := c.badHost[m]; bad && now.Sub(t) < mirrorPenalty {
			continue
		}
		hosts = append(hosts, m)
	}
	c.mu.Unlock()
	return append(hosts, host)
}

// mirrorPenalty is how long a mirror that failed is skipped.
const mirrorPenalty = 30 * time.Second

// eachReadHost runs fn on each read host until one succeeds. The last
// host's error is returned; mirrors that fail (other than for a missing
// object) are skipped for a while.
func (c *Client) eachReadHost(ctx context.Context, host string, fn func(host string) error) error {
	hosts := c.readHosts(host)
	var err error
	for i, h := range hosts {
		if err = fn(h); err == nil {
			return nil
		}
		if ctx.Err() != nil || i == len(hosts)-1 {
			break
		}
		if !errors.Is(err, ErrNotFound) {
			c.mu.Lock()
			c.badHost[h] = time.Now()
			c.mu.Unlock()
		}
		log.G(ctx).WithError(err).WithFields(log.Fields{"mirror": h, "host": host}).Warn("registry mirror failed, trying next")
	}
	return err
}

// classify wraps err with the kind callers branch on.
func classify(err error) error {
	if err == nil {
		return nil
	}
	for _, kind := range []error{ErrNotFound, ErrUnauthorized, ErrUnreachable, ErrUnsupportedMediaType, ErrRangeMismatch, ErrNotMounted} {
		if errors.Is(err, kind) {
			return err
		}
	}
	var er *errcode.ErrorResponse
	switch {
	case errors.Is(err, context.Canceled):
		return err
	case errors.Is(err, errdef.ErrNotFound):
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	case errors.As(err, &er) && er.StatusCode == http.StatusNotFound:
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	case errors.As(err, &er) && (er.StatusCode == http.StatusUnauthorized || er.StatusCode == http.StatusForbidden),
		errors.Is(err, auth.ErrBasicCredentialNotFound):
		return fmt.Errorf("%w: %w", ErrUnauthorized, err)
	case isDialError(err), errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	return err
}

// statusError turns an unexpected HTTP response into an error of the right
// kind, quoting the start of the body.
func statusError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	msg := strings.TrimSpace(string(body))
	err := fmt.Errorf("%s %s: %s: %s", resp.Request.Method, resp.Request.URL.Redacted(), resp.Status, msg)
	switch resp.StatusCode {
	case http.StatusNotFound:
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	case http.StatusUnauthorized, http.StatusForbidden:
		return fmt.Errorf("%w: %w", ErrUnauthorized, err)
	case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	return err
}

// get sends a GET for /v2/<repo><suffix> on host with pull scope, and
// returns the response whatever its status.
func (c *Client) get(ctx context.Context, host, repo, suffix string, header http.Header) (*http.Response, error) {
	s, err := c.scheme(ctx, host)
	if err != nil {
		return nil, err
	}
	ctx = auth.AppendRepositoryScope(ctx, registry.Reference{Registry: host, Repository: repo}, auth.ActionPull)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s+"://"+host+"/v2/"+repo+suffix, nil)
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := c.auth.Do(req)
	if err != nil {
		return nil, classify(err)
	}
	return resp, nil
}
