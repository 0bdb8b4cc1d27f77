package fetcher

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
)

// Docker schema 2 media types (the OCI ones come from image-spec).
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	MediaTypeDockerConfig       = "application/vnd.docker.container.image.v1+json"
)

// manifestAccept is the Accept header of manifest fetches.
var manifestAccept = strings.Join([]string{
	ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageIndex,
	MediaTypeDockerManifest, MediaTypeDockerManifestList,
}, ", ")

// IsIndex reports whether mediaType is an OCI index or Docker manifest list.
func IsIndex(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageIndex || mediaType == MediaTypeDockerManifestList
}

// IsImageManifest reports whether mediaType is an OCI or Docker schema 2
// image manifest.
func IsImageManifest(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageManifest || mediaType == MediaTypeDockerManifest
}

// Resolve returns the descriptor of the manifest ref names (by digest if it
// has one, else by tag): OCI and Docker schema 2 manifests and indexes.
func (c *Client) Resolve(ctx context.Context, ref Ref) (ocispec.Descriptor, error) {
	var desc ocispec.Descriptor
	err := c.eachReadHost(ctx, ref.Host, func(host string) error {
		repo, err := c.repository(ctx, host, ref.Repository)
		if err != nil {
			return err
		}
		d, err := repo.Resolve(ctx, ref.reference())
		if err != nil {
			return classify(err)
		}
		desc = d
		return nil
	})
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("resolve %s: %w", ref, err)
	}
	if ref.Digest != "" && desc.Digest != ref.Digest {
		return ocispec.Descriptor{}, fmt.Errorf("resolve %s: registry answered %s: %w", ref, desc.Digest, artifact.ErrDigestMismatch)
	}
	return desc, nil
}

// FetchManifest returns the manifest desc describes (desc.Digest must be
// set; desc.Size is checked when non-zero), verified against desc.Digest
// and at most MaxManifestBytes long.
func (c *Client) FetchManifest(ctx context.Context, ref Ref, desc ocispec.Descriptor) ([]byte, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("fetch manifest of %s: %w", ref, err)
	}
	if desc.Size > MaxManifestBytes {
		return nil, fmt.Errorf("fetch manifest %s of %s: size %d over limit %d", desc.Digest, ref, desc.Size, MaxManifestBytes)
	}
	var b []byte
	err := c.eachReadHost(ctx, ref.Host, func(host string) error {
		accept := manifestAccept
		if desc.MediaType != "" {
			accept = desc.MediaType + ", " + accept
		}
		resp, err := c.get(ctx, host, ref.Repository, "/manifests/"+desc.Digest.String(), http.Header{"Accept": {accept}})
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return statusError(resp)
		}
		b, err = io.ReadAll(io.LimitReader(resp.Body, MaxManifestBytes+1))
		if err != nil {
			return classify(err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("fetch manifest %s of %s: %w", desc.Digest, ref, err)
	}
	if len(b) > MaxManifestBytes {
		return nil, fmt.Errorf("fetch manifest %s of %s: larger than %d bytes", desc.Digest, ref, MaxManifestBytes)
	}
	if desc.Size > 0 && int64(len(b)) != desc.Size {
		return nil, fmt.Errorf("fetch manifest %s of %s: %d bytes, want %d: %w", desc.Digest, ref, len(b), desc.Size, artifact.ErrDigestMismatch)
	}
	if got := desc.Digest.Algorithm().FromBytes(b); got != desc.Digest {
		return nil, fmt.Errorf("fetch manifest %s of %s: got %s: %w", desc.Digest, ref, got, artifact.ErrDigestMismatch)
	}
	return b, nil
}

// PushManifest uploads manifest b of mediaType under tag (by digest when
// tag is ""). When the manifest has a subject and the registry lacks the
// referrers API, oras-go also updates the sha256-<hex> tag index.
func (c *Client) PushManifest(ctx context.Context, ref Ref, mediaType string, b []byte, tag string) (ocispec.Descriptor, error) {
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	repo, err := c.repository(ctx, ref.Host, ref.Repository)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("push manifest to %s: %w", ref.Name(), classify(err))
	}
	if tag == "" {
		err = repo.Manifests().Push(ctx, desc, bytes.NewReader(b))
	} else {
		err = repo.PushReference(ctx, desc, bytes.NewReader(b), tag)
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("push manifest %s to %s (tag %q): %w", desc.Digest, ref.Name(), tag, classify(err))
	}
	log.G(ctx).WithFields(log.Fields{"image": ref.Name(), "digest": desc.Digest, "tag": tag, "op": "push-manifest"}).Debug("manifest pushed")
	return desc, nil
}

// ImageManifest is one platform's image manifest.
type ImageManifest struct {
	Descriptor ocispec.Descriptor
	Manifest   ocispec.Manifest
	// Platform is from the index entry, or from the image config for a
	// single manifest; nil when unknown.
	Platform *ocispec.Platform
}

// ImageManifests returns the image manifests ref names. For an index (or
// Docker manifest list): every image manifest, skipping attestations and
// unknown entries, or only the one matching platform ("linux/arm64",
// "linux/arm/v7") when platform is set. For a single manifest: that one.
// Other media types give ErrUnsupportedMediaType.
func (c *Client) ImageManifests(ctx context.Context, ref Ref, platform string) ([]ImageManifest, error) {
	var match platforms.MatchComparer
	if platform != "" {
		p, err := platforms.Parse(platform)
		if err != nil {
			return nil, fmt.Errorf("image manifests of %s: %w", ref, err)
		}
		// As containerd pulls: the platform or one it can run (arm/v7 runs
		// arm/v6), preferring the closest.
		match = platforms.Only(p)
	}
	desc, err := c.Resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	b, err := c.FetchManifest(ctx, ref, desc)
	if err != nil {
		return nil, err
	}
	mt := mediaTypeOf(desc.MediaType, b)
	switch {
	case IsIndex(mt):
		return c.indexManifests(ctx, ref, b, platform, match)
	case IsImageManifest(mt):
		im, err := c.imageManifest(ctx, ref, desc, b)
		if err != nil {
			return nil, err
		}
		if match != nil && im.Platform != nil && !match.Match(*im.Platform) {
			return nil, fmt.Errorf("image manifests of %s: image is %s, want %s: %w", ref, PlatformString(im.Platform), platform, ErrNotFound)
		}
		return []ImageManifest{im}, nil
	}
	return nil, fmt.Errorf("image manifests of %s: %q: %w", ref, mt, ErrUnsupportedMediaType)
}

func (c *Client) indexManifests(ctx context.Context, ref Ref, b []byte, platform string, match platforms.MatchComparer) ([]ImageManifest, error) {
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("image manifests of %s: decode index: %w", ref, err)
	}
	var picked []ocispec.Descriptor
	for _, d := range idx.Manifests {
		switch {
		case !IsImageManifest(d.MediaType),
			d.Annotations["vnd.docker.reference.type"] != "", // buildkit attestation
			d.Platform != nil && (d.Platform.OS == "unknown" || d.Platform.Architecture == "unknown"):
			log.G(ctx).WithFields(log.Fields{"image": ref.String(), "manifest": d.Digest, "mediaType": d.MediaType}).Debug("index entry skipped: not an image manifest")
			continue
		case match != nil && (d.Platform == nil || !match.Match(*d.Platform)):
			continue
		}
		picked = append(picked, d)
	}
	if match != nil && len(picked) > 0 {
		// The best match only, as containerd would pull it.
		best := picked[0]
		for _, d := range picked[1:] {
			if match.Less(*d.Platform, *best.Platform) {
				best = d
			}
		}
		picked = []ocispec.Descriptor{best}
	}
	if len(picked) == 0 {
		if platform != "" {
			return nil, fmt.Errorf("image manifests of %s: no image for platform %s: %w", ref, platform, ErrNotFound)
		}
		return nil, fmt.Errorf("image manifests of %s: index has no image manifest: %w", ref, ErrUnsupportedMediaType)
	}
	out := make([]ImageManifest, 0, len(picked))
	for _, d := range picked {
		mb, err := c.FetchManifest(ctx, ref, d)
		if err != nil {
			return nil, err
		}
		var m ocispec.Manifest
		if err := json.Unmarshal(mb, &m); err != nil {
			return nil, fmt.Errorf("image manifests of %s: decode manifest %s: %w", ref, d.Digest, err)
		}
		out = append(out, ImageManifest{Descriptor: d, Manifest: m, Platform: d.Platform})
	}
	return out, nil
}

// maxConfigBytes bounds the image config read to learn a platform.
const maxConfigBytes = 1 << 20

func (c *Client) imageManifest(ctx context.Context, ref Ref, desc ocispec.Descriptor, b []byte) (ImageManifest, error) {
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return ImageManifest{}, fmt.Errorf("decode manifest %s of %s: %w", desc.Digest, ref, err)
	}
	desc.MediaType = mediaTypeOf(desc.MediaType, b)
	im := ImageManifest{Descriptor: desc, Manifest: m, Platform: desc.Platform}
	if im.Platform == nil && (m.Config.MediaType == ocispec.MediaTypeImageConfig || m.Config.MediaType == MediaTypeDockerConfig) &&
		m.Config.Size > 0 && m.Config.Size <= maxConfigBytes {
		p, err := c.configPlatform(ctx, ref, m.Config)
		if err != nil {
			log.G(ctx).WithError(err).WithField("image", ref.String()).Debug("platform of image config unknown")
		} else {
			im.Platform = p
		}
	}
	return im, nil
}

func (c *Client) configPlatform(ctx context.Context, ref Ref, desc ocispec.Descriptor) (*ocispec.Platform, error) {
	rc, err := c.FetchBlob(ctx, ref, desc)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return nil, err
	}
	var img ocispec.Image
	if err := json.Unmarshal(b, &img); err != nil {
		return nil, fmt.Errorf("decode image config %s: %w", desc.Digest, err)
	}
	if img.OS == "" || img.Architecture == "" {
		return nil, fmt.Errorf("image config %s names no platform", desc.Digest)
	}
	p := img.Platform
	return &p, nil
}

// mediaTypeOf returns the registry's media type, or the manifest's own
// mediaType field when the registry gave none or a generic one.
func mediaTypeOf(mt string, b []byte) string {
	if mt != "" && mt != "application/json" && mt != "application/octet-stream" {
		return mt
	}
	var v struct {
		MediaType string `json:"mediaType"`
	}
	if json.Unmarshal(b, &v) == nil && v.MediaType != "" {
		return v.MediaType
	}
	return mt
}

// PlatformString formats p as "os/arch[/variant]" ("" for nil).
func PlatformString(p *ocispec.Platform) string {
	if p == nil {
		return ""
	}
	return platforms.Format(*p)
}
