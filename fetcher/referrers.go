package fetcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"slices"

	"github.com/containerd/log"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
)

// Referrers lists the manifests whose subject is subject, filtered by
// artifactType ("" for all). It uses the OCI referrers API and, when the
// registry lacks it (404 or an answer that is not an index), the
// sha256-<hex> tag schema index (oras-go does both). No referrers is an
// empty list, not an error.
func (c *Client) Referrers(ctx context.Context, ref Ref, subject ocispec.Descriptor, artifactType string) ([]ocispec.Descriptor, error) {
	var out []ocispec.Descriptor
	err := c.eachReadHost(ctx, ref.Host, func(host string) error {
		repo, err := c.repository(ctx, host, ref.Repository)
		if err != nil {
			return err
		}
		out = out[:0]
		return classify(repo.Referrers(ctx, subject, artifactType, func(page []ocispec.Descriptor) error {
			out = append(out, page...)
			return nil
		}))
	})
	if err != nil {
		return nil, fmt.Errorf("list referrers of %s in %s: %w", subject.Digest, ref.Name(), err)
	}
	return out, nil
}

// referrersAPI reports whether ref's registry serves the OCI referrers API.
func (c *Client) referrersAPI(ctx context.Context, ref Ref, subject ocispec.Descriptor) (bool, error) {
	resp, err := c.get(ctx, ref.Host, ref.Repository, "/referrers/"+subject.Digest.String(), http.Header{"Accept": {ocispec.MediaTypeImageIndex}})
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
		return mt == ocispec.MediaTypeImageIndex, nil
	case http.StatusNotFound, http.StatusMethodNotAllowed, http.StatusBadRequest:
		return false, nil
	}
	return false, statusError(resp)
}

// AddReferrer records artifactDesc as a referrer of subject in the
// sha256-<hex> tag index, read-modify-write, when the registry lacks the
// referrers API (with the API, the registry indexes by itself and this does
// nothing). It is idempotent. PushManifest already does this for manifests
// with a subject; AddReferrer repairs or backfills an index. Concurrent
// writers to one index may race; the write is checked and redone.
func (c *Client) AddReferrer(ctx context.Context, ref Ref, subject ocispec.Descriptor, artifactDesc ocispec.Descriptor) error {
	ok, err := c.referrersAPI(ctx, ref, subject)
	if err != nil {
		return fmt.Errorf("add referrer to %s: probe referrers API: %w", subject.Digest, err)
	}
	if ok {
		return nil
	}
	tag := artifact.TagFallback(subject.Digest)
	for attempt := 0; attempt < 3; attempt++ {
		idx, err := c.fallbackIndex(ctx, ref, tag)
		if err != nil {
			return fmt.Errorf("add referrer to %s: %w", subject.Digest, err)
		}
		if slices.ContainsFunc(idx.Manifests, func(d ocispec.Descriptor) bool { return d.Digest == artifactDesc.Digest }) {
			return nil
		}
		if attempt > 0 {
			log.G(ctx).WithFields(log.Fields{"image": ref.Name(), "tag": tag}).Warn("referrers tag index changed under us, retrying")
		}
		d := ocispec.Descriptor{
			MediaType:    artifactDesc.MediaType,
			ArtifactType: artifactDesc.ArtifactType,
			Digest:       artifactDesc.Digest,
			Size:         artifactDesc.Size,
			Annotations:  artifactDesc.Annotations,
		}
		if d.MediaType == "" {
			d.MediaType = ocispec.MediaTypeImageManifest
		}
		idx.Manifests = append(idx.Manifests, d)
		b, err := json.Marshal(idx)
		if err != nil {
			return fmt.Errorf("add referrer to %s: %w", subject.Digest, err)
		}
		if _, err := c.PushManifest(ctx, ref, ocispec.MediaTypeImageIndex, b, tag); err != nil {
			return fmt.Errorf("add referrer to %s: %w", subject.Digest, err)
		}
		log.G(ctx).WithFields(log.Fields{"image": ref.Name(), "subject": subject.Digest, "artifact": artifactDesc.Digest, "tag": tag, "op": "add-referrer"}).Info("referrers tag index updated")
	}
	// Verify the last write stuck.
	idx, err := c.fallbackIndex(ctx, ref, tag)
	if err != nil {
		return fmt.Errorf("add referrer to %s: %w", subject.Digest, err)
	}
	if !slices.ContainsFunc(idx.Manifests, func(d ocispec.Descriptor) bool { return d.Digest == artifactDesc.Digest }) {
		return fmt.Errorf("add referrer to %s: concurrent updates of tag %s keep dropping it", subject.Digest, tag)
	}
	return nil
}

// fallbackIndex reads the tag schema index (an empty one if absent).
func (c *Client) fallbackIndex(ctx context.Context, ref Ref, tag string) (*ocispec.Index, error) {
	empty := &ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{}}
	tagRef := ref
	tagRef.Tag, tagRef.Digest = tag, ""
	repo, err := c.repository(ctx, ref.Host, ref.Repository)
	if err != nil {
		return nil, classify(err)
	}
	desc, err := repo.Resolve(ctx, tag)
	if err != nil {
		if err = classify(err); isNotFound(err) {
			return empty, nil
		}
		return nil, fmt.Errorf("resolve referrers tag %s: %w", tag, err)
	}
	b, err := c.FetchManifest(ctx, tagRef, desc)
	if err != nil {
		return nil, err
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil || mediaTypeOf(desc.MediaType, b) != ocispec.MediaTypeImageIndex {
		return nil, fmt.Errorf("referrers tag %s is not an OCI index (%s): %w", tag, desc.MediaType, ErrUnsupportedMediaType)
	}
	idx.MediaType = ocispec.MediaTypeImageIndex
	idx.SchemaVersion = 2
	return &idx, nil
}

// FindArtifact returns the streaming artifact of subject in ref's
// repository: among referrers of artifact.ArtifactType, each candidate
// manifest is fetched (verified by digest), parsed and kept only if its
// subject is subject; the newest by creation time wins, ties going to the
// greatest digest so every node picks the same one. ErrNoArtifact when none
// qualifies.
func (c *Client) FindArtifact(ctx context.Context, ref Ref, subject ocispec.Descriptor) (*artifact.Manifest, ocispec.Descriptor, error) {
	cands, err := c.Referrers(ctx, ref, subject, artifact.ArtifactType)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("find streaming artifact: %w", err)
	}
	l := log.G(ctx).WithFields(log.Fields{"image": ref.String(), "subject": subject.Digest, "op": "find-artifact"})
	var (
		best     *artifact.Manifest
		bestDesc ocispec.Descriptor
		rejected int
	)
	for _, d := range cands {
		b, err := c.FetchManifest(ctx, ref, d)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ocispec.Descriptor{}, fmt.Errorf("find streaming artifact: %w", err)
			}
			l.WithError(err).WithField("artifact", d.Digest).Warn("streaming artifact candidate unreadable, skipped")
			rejected++
			continue
		}
		m, err := artifact.ParseManifest(b)
		if err != nil || m == nil {
			l.WithError(err).WithField("artifact", d.Digest).Warn("streaming artifact candidate invalid, skipped")
			rejected++
			continue
		}
		if m.Subject.Digest != subject.Digest {
			l.WithFields(log.Fields{"artifact": d.Digest, "claims": m.Subject.Digest}).Warn("streaming artifact candidate refers to another image, skipped")
			rejected++
			continue
		}
		if best == nil || m.Created.After(best.Created) ||
			(m.Created.Equal(best.Created) && d.Digest.String() > bestDesc.Digest.String()) {
			best, bestDesc = m, d
		}
	}
	if best == nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("find streaming artifact for %s (%d candidates, %d rejected): %w", subject.Digest, len(cands), rejected, ErrNoArtifact)
	}
	reason := "only candidate"
	if len(cands)-rejected > 1 {
		reason = "newest of valid candidates (ties: greatest digest)"
	}
	l.WithFields(log.Fields{"artifact": bestDesc.Digest, "created": best.Created, "candidates": len(cands), "rejected": rejected, "reason": reason}).Info("streaming artifact selected")
	return best, bestDesc, nil
}

func isNotFound(err error) bool { return errors.Is(err, ErrNotFound) }
