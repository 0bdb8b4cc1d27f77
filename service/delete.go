package service

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
)

// Deleter deletes a manifest from a repository and drops it from the
// referrers of its subject (the tag-schema index when the registry has no
// referrers API).
type Deleter interface {
	DeleteManifest(ctx context.Context, ref fetcher.Ref, desc ocispec.Descriptor) error
}

// RegistryDeleter deletes manifests with oras-go, which also updates the
// referrers tag index on registries without the referrers API. The
// registry must allow deletes (distribution: storage.delete.enabled).
type RegistryDeleter struct {
	// Insecure hosts are reached over plain HTTP; loopback hosts always are.
	Insecure []string
	// Username and Password, when set, authenticate every request.
	Username, Password string
}

func (d *RegistryDeleter) plainHTTP(host string) bool {
	h := host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		h = hh
	}
	for _, i := range d.Insecure {
		if i == host || i == h {
			return true
		}
	}
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(strings.Trim(h, "[]"))
	return ip != nil && ip.IsLoopback()
}

// DeleteManifest deletes desc from ref's repository.
func (d *RegistryDeleter) DeleteManifest(ctx context.Context, ref fetcher.Ref, desc ocispec.Descriptor) error {
	client := &auth.Client{Client: &http.Client{Timeout: time.Minute}, Cache: auth.NewCache()}
	if d.Username != "" {
		client.Credential = auth.StaticCredential(ref.Host, auth.Credential{Username: d.Username, Password: d.Password})
	}
	repo := &remote.Repository{
		Client:          client,
		Reference:       registry.Reference{Registry: ref.Host, Repository: ref.Repository},
		PlainHTTP:       d.plainHTTP(ref.Host),
		SkipReferrersGC: true,
	}
	if err := repo.Manifests().Delete(ctx, desc); err != nil {
		return fmt.Errorf("delete manifest %s from %s: %w", desc.Digest, ref.Name(), err)
	}
	return nil
}

// DeleteArtifacts deletes the streaming artifacts of every image manifest
// image names (each platform of an index), leaving the image itself, and
// returns the digests deleted: ErrNotFound when the image has none.
func (s *Service) DeleteArtifacts(ctx context.Context, image string) ([]digest.Digest, error) {
	if s.cfg.Deleter == nil {
		return nil, fmt.Errorf("delete artifacts: no deleter configured")
	}
	ref, err := parseImage(image)
	if err != nil {
		return nil, err
	}
	c := s.cfg.Registry
	ims, err := c.ImageManifests(ctx, ref, "")
	if err != nil {
		return nil, fmt.Errorf("delete artifacts of %s: %w", ref, registryError(err))
	}
	var deleted []digest.Digest
	for _, im := range ims {
		subject := ocispec.Descriptor{MediaType: im.Descriptor.MediaType, Digest: im.Descriptor.Digest, Size: im.Descriptor.Size}
		refs, err := c.Referrers(ctx, ref, subject, artifact.ArtifactType)
		if err != nil {
			return deleted, fmt.Errorf("delete artifacts of %s: %w", ref, registryError(err))
		}
		for _, a := range refs {
			desc := ocispec.Descriptor{MediaType: a.MediaType, Digest: a.Digest, Size: a.Size}
			if desc.MediaType == "" {
				desc.MediaType = ocispec.MediaTypeImageManifest
			}
			if err := s.cfg.Deleter.DeleteManifest(ctx, ref, desc); err != nil {
				return deleted, fmt.Errorf("delete artifacts of %s: %w", ref, err)
			}
			log.G(ctx).WithFields(log.Fields{"image": ref.String(), "subject": subject.Digest, "artifact": a.Digest, "op": "delete"}).Info("streaming artifact deleted")
			deleted = append(deleted, a.Digest)
		}
	}
	if len(deleted) == 0 {
		return nil, fmt.Errorf("delete artifacts of %s: %w: %w", ref, ErrNotFound, fetcher.ErrNoArtifact)
	}
	return deleted, nil
}
