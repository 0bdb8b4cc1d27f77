package fetcher

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/errdef"
	"oras.land/oras-go/v2/registry/remote/errcode"
)

// ErrDeleteRefused: the registry does not allow deleting manifests (the
// distribution registry answers 405 UNSUPPORTED unless
// storage.delete.enabled is set).
var ErrDeleteRefused = errors.New("registry refuses deletes")

// DeleteManifest deletes the manifest desc from ref's repository. For a
// manifest with a subject on a registry without the referrers API, oras-go
// first drops it from the subject's sha256-<hex> tag index, so it is no
// longer listed as a referrer even when the registry then refuses the
// DELETE itself (ErrDeleteRefused).
func (c *Client) DeleteManifest(ctx context.Context, ref Ref, desc ocispec.Descriptor) error {
	if desc.MediaType == "" {
		desc.MediaType = ocispec.MediaTypeImageManifest
	}
	repo, err := c.repository(ctx, ref.Host, ref.Repository)
	if err != nil {
		return fmt.Errorf("delete manifest %s from %s: %w", desc.Digest, ref.Name(), classify(err))
	}
	if err := repo.Manifests().Delete(ctx, desc); err != nil {
		var er *errcode.ErrorResponse
		if errors.Is(err, errdef.ErrUnsupported) || (errors.As(err, &er) && er.StatusCode == http.StatusMethodNotAllowed) {
			return fmt.Errorf("delete manifest %s from %s: %w: %w", desc.Digest, ref.Name(), ErrDeleteRefused, err)
		}
		return fmt.Errorf("delete manifest %s from %s: %w", desc.Digest, ref.Name(), classify(err))
	}
	log.G(ctx).WithFields(log.Fields{"image": ref.Name(), "digest": desc.Digest, "op": "delete-manifest"}).Debug("manifest deleted")
	return nil
}
