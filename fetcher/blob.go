package fetcher

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
)

// Limits of range reads.
const (
	// MaxRangeBytes bounds one ReadRange call.
	MaxRangeBytes = 256 << 20
	// maxIgnoredRange bounds how far into a blob ReadRange reads when the
	// registry ignores Range and answers 200 with the whole blob.
	maxIgnoredRange = 64 << 20
)

// FetchBlob streams the blob desc describes. The reader fails with an error
// wrapping artifact.ErrDigestMismatch when the bytes differ from desc.Size
// or desc.Digest; callers must read to EOF before trusting them.
func (c *Client) FetchBlob(ctx context.Context, ref Ref, desc ocispec.Descriptor) (io.ReadCloser, error) {
	v, err := newVerifier(desc)
	if err != nil {
		return nil, fmt.Errorf("fetch blob of %s: %w", ref, err)
	}
	var body io.ReadCloser
	err = c.eachReadHost(ctx, ref.Host, func(host string) error {
		resp, err := c.get(ctx, host, ref.Repository, "/blobs/"+desc.Digest.String(), nil)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			defer resp.Body.Close()
			return statusError(resp)
		}
		if resp.ContentLength >= 0 && resp.ContentLength != desc.Size {
			resp.Body.Close()
			return fmt.Errorf("Content-Length %d, want %d: %w", resp.ContentLength, desc.Size, artifact.ErrDigestMismatch)
		}
		body = resp.Body
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("fetch blob %s of %s: %w", desc.Digest, ref, err)
	}
	v.rc = body
	return v, nil
}

// verifyReader checks size and digest of what it reads.
type verifyReader struct {
	rc   io.ReadCloser
	desc ocispec.Descriptor
	h    hash.Hash
	n    int64
	err  error
}

func newVerifier(desc ocispec.Descriptor) (*verifyReader, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, err
	}
	if desc.Size < 0 {
		return nil, fmt.Errorf("negative size %d", desc.Size)
	}
	return &verifyReader{desc: desc, h: desc.Digest.Algorithm().Hash()}, nil
}

func (v *verifyReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.rc.Read(p)
	v.n += int64(n)
	v.h.Write(p[:n])
	switch {
	case v.n > v.desc.Size:
		v.err = fmt.Errorf("blob %s: more than %d bytes: %w", v.desc.Digest, v.desc.Size, artifact.ErrDigestMismatch)
		return n, v.err
	case err == io.EOF:
		if v.n != v.desc.Size {
			v.err = fmt.Errorf("blob %s: %d bytes, want %d: %w", v.desc.Digest, v.n, v.desc.Size, artifact.ErrDigestMismatch)
		} else if got := digest.NewDigest(v.desc.Digest.Algorithm(), v.h); got != v.desc.Digest {
			v.err = fmt.Errorf("blob %s: got %s: %w", v.desc.Digest, got, artifact.ErrDigestMismatch)
		} else {
			v.err = io.EOF
		}
		return n, v.err
	case err != nil:
		v.err = classify(err)
		return n, v.err
	}
	return n, nil
}

func (v *verifyReader) Close() error { return v.rc.Close() }

// ReadRange reads n bytes at offset off of blob with an HTTP Range request
// (redirects to blob storage are followed). The answer must be a 206 whose
// Content-Range is exactly the range asked for, or a 200 with the whole
// blob when the registry ignores Range (then only if off+n is at most
// 64 MiB). Transient failures are retried; the call is bounded by
// Options.Timeout. The bytes are not verified: callers check chunk digests.
//
// ReadRange is the hot path of lazy pulls: connections are kept alive and a
// bearer token, once held for the repository's pull scope, is sent without
// a challenge round trip.
func (c *Client) ReadRange(ctx context.Context, ref Ref, blob digest.Digest, off, n int64) ([]byte, error) {
	if n < 0 || n > MaxRangeBytes {
		return nil, fmt.Errorf("read range of blob %s: bad range off=%d n=%d", blob, off, n)
	}
	buf := make([]byte, n)
	if err := c.ReadRangeInto(ctx, ref, blob, off, buf, nil); err != nil {
		return nil, err
	}
	return buf, nil
}

// PaceStep is how many bytes of a range's body ReadRangeInto reads between
// two calls of its pace function.
const PaceStep = 256 << 10

// ReadRangeInto is ReadRange reading the len(buf) bytes at off into buf,
// which a caller can take from a pool: a fresh buffer of megabytes per
// range costs a page fault and the zeroing of every page. When pace is not
// nil, the body is read PaceStep bytes at a time and pace is called before
// each step but the first: copying a range off the socket is CPU work,
// and background work gives way there. buf's content is undefined after
// an error.
func (c *Client) ReadRangeInto(ctx context.Context, ref Ref, blob digest.Digest, off int64, buf []byte, pace func()) error {
	n := int64(len(buf))
	if off < 0 || n > MaxRangeBytes {
		return fmt.Errorf("read range of blob %s: bad range off=%d n=%d", blob, off, n)
	}
	if n == 0 {
		return nil
	}
	if err := blob.Validate(); err != nil {
		return fmt.Errorf("read range of %s: %w", ref, err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	err := c.eachReadHost(ctx, ref.Host, func(host string) error {
		var err error
		for attempt := 0; ; attempt++ {
			err = c.readRange(ctx, host, ref.Repository, blob, off, buf, pace)
			// Status codes are retried by the transport; here only bodies
			// cut short mid-read.
			if err == nil || attempt >= c.opts.Retries || ctx.Err() != nil || !bodyCut(err) {
				return err
			}
			log.G(ctx).WithError(err).WithFields(log.Fields{"image": ref.Name(), "blob": blob, "offset": off, "op": "read-range"}).Debug("range read cut short, retrying")
		}
	})
	if err != nil {
		return fmt.Errorf("read range [%d,+%d) of blob %s in %s: %w", off, n, blob, ref.Name(), err)
	}
	return nil
}

func bodyCut(err error) bool {
	return errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
}

// readRange reads a range from host: from the blob's storage location when
// the registry redirected an earlier read of the blob there (blobLocations),
// else from the registry, remembering where it redirected to. A location
// that fails is forgotten and the registry asked again, once.
func (c *Client) readRange(ctx context.Context, host, repo string, blob digest.Digest, off int64, buf []byte, pace func()) error {
	n := int64(len(buf))
	rangeHeader := http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", off, off+n-1)}}
	key := host + "/" + repo + "@" + blob.String()
	if loc, ok := c.locations.get(key); ok {
		err := c.readRangeAt(ctx, loc, rangeHeader, off, buf, pace)
		if err == nil || ctx.Err() != nil {
			return err
		}
		c.locations.forget(key, loc)
		log.G(ctx).WithError(err).WithFields(log.Fields{"host": host, "repository": repo, "blob": blob, "op": "read-range"}).Debug("blob storage location failed, asking the registry again")
	}
	resp, err := c.get(ctx, host, repo, "/blobs/"+blob.String(), rangeHeader)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	err = rangeBody(resp, off, buf, pace)
	if err == nil && resp.Request.Response != nil && resp.Request.URL.Host != host {
		// The registry redirected to blob storage or a CDN: later reads
		// of this blob go there directly, saving a round trip each. (A
		// redirect to the registry itself may need the registry's
		// credentials, which a location is not sent: not remembered.)
		c.locations.put(key, resp.Request.URL)
		c.redirects.Add(1)
	}
	return err
}

// readRangeAt reads a range from a blob storage location. It sends no
// registry credentials (a signed location carries its own).
func (c *Client) readRangeAt(ctx context.Context, loc *url.URL, header http.Header, off int64, buf []byte, pace func()) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, loc.String(), nil)
	if err != nil {
		return err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return classify(err)
	}
	defer resp.Body.Close()
	return rangeBody(resp, off, buf, pace)
}

// rangeBody reads the len(buf) bytes at off from the answer to a range
// request into buf, calling pace between steps when it is not nil.
func rangeBody(resp *http.Response, off int64, buf []byte, pace func()) error {
	n := int64(len(buf))
	end := off + n - 1
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, last, _, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return fmt.Errorf("%w: %w", ErrRangeMismatch, err)
		}
		if start != off || last != end {
			return fmt.Errorf("%w: asked bytes %d-%d, got Content-Range %q", ErrRangeMismatch, off, end, resp.Header.Get("Content-Range"))
		}
		if resp.ContentLength >= 0 && resp.ContentLength != n {
			return fmt.Errorf("%w: Content-Length %d for %d bytes", ErrRangeMismatch, resp.ContentLength, n)
		}
	case http.StatusOK:
		if off+n > maxIgnoredRange {
			return fmt.Errorf("%w: registry ignored Range and the range ends past %d bytes", ErrRangeMismatch, maxIgnoredRange)
		}
		if resp.ContentLength >= 0 && resp.ContentLength < off+n {
			return fmt.Errorf("%w: blob has %d bytes, range ends at %d", ErrRangeMismatch, resp.ContentLength, off+n)
		}
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			return classify(unexpected(err))
		}
	case http.StatusRequestedRangeNotSatisfiable:
		return fmt.Errorf("%w: %s (Content-Range %q)", ErrRangeMismatch, resp.Status, resp.Header.Get("Content-Range"))
	default:
		return statusError(resp)
	}
	step := len(buf)
	if pace != nil {
		step = PaceStep
	}
	for at := 0; at < len(buf); at += step {
		if at > 0 {
			pace()
		}
		if _, err := io.ReadFull(resp.Body, buf[at:min(at+step, len(buf))]); err != nil {
			return classify(unexpected(err))
		}
	}
	return nil
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// parseContentRange parses "bytes first-last/total" (total may be "*").
func parseContentRange(s string) (first, last, total int64, err error) {
	bad := fmt.Errorf("malformed Content-Range %q", s)
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	if first, err = strconv.ParseInt(a, 10, 64); err != nil {
		return 0, 0, 0, bad
	}
	if last, err = strconv.ParseInt(b, 10, 64); err != nil || last < first {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil || total <= last {
			return 0, 0, 0, bad
		}
	}
	return first, last, total, nil
}

// BlobExists reports whether the blob desc describes is in ref's repository
// (HEAD, no mirrors: it is asked before pushing).
func (c *Client) BlobExists(ctx context.Context, ref Ref, desc ocispec.Descriptor) (bool, error) {
	repo, err := c.repository(ctx, ref.Host, ref.Repository)
	if err != nil {
		return false, fmt.Errorf("check blob in %s: %w", ref.Name(), classify(err))
	}
	ok, err := repo.Blobs().Exists(ctx, desc)
	if err != nil {
		return false, fmt.Errorf("check blob %s in %s: %w", desc.Digest, ref.Name(), classify(err))
	}
	return ok, nil
}

// PushBlob uploads r (desc.Size bytes) as desc into ref's repository,
// streaming it in one monolithic PUT (oras-go): memory use does not grow
// with the blob. The registry verifies the digest. The body is not
// replayable, so a failed upload is not retried here.
func (c *Client) PushBlob(ctx context.Context, ref Ref, desc ocispec.Descriptor, r io.Reader) error {
	repo, err := c.repository(ctx, ref.Host, ref.Repository)
	if err != nil {
		return fmt.Errorf("push blob to %s: %w", ref.Name(), classify(err))
	}
	if err := repo.Blobs().Push(ctx, desc, r); err != nil {
		return fmt.Errorf("push blob %s to %s: %w", desc.Digest, ref.Name(), classify(err))
	}
	log.G(ctx).WithFields(log.Fields{"image": ref.Name(), "blob": desc.Digest, "size": desc.Size, "op": "push-blob"}).Debug("blob pushed")
	return nil
}

// MountBlob asks the registry to mount blob desc from from's repository
// into ref's (same host only). When the registry answers with an upload
// session instead (blob absent from the source, or mounting unsupported),
// it returns an error wrapping ErrNotMounted and the caller pushes the blob.
func (c *Client) MountBlob(ctx context.Context, ref Ref, from Ref, desc ocispec.Descriptor) error {
	if from.Host != ref.Host {
		return fmt.Errorf("mount blob %s from %s into %s: different registries: %w", desc.Digest, from.Name(), ref.Name(), ErrNotMounted)
	}
	repo, err := c.repository(ctx, ref.Host, ref.Repository)
	if err != nil {
		return fmt.Errorf("mount blob into %s: %w", ref.Name(), classify(err))
	}
	err = repo.Mount(ctx, desc, from.Repository, func() (io.ReadCloser, error) { return nil, ErrNotMounted })
	if err != nil {
		return fmt.Errorf("mount blob %s from %s into %s: %w", desc.Digest, from.Name(), ref.Name(), classify(err))
	}
	return nil
}
