package fetcher

import (
	"fmt"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

// Ref names an image (or any manifest) in a registry.
type Ref struct {
	// Host is the registry host[:port], e.g. "127.0.0.1:5000".
	Host string
	// Repository is the path inside the registry, e.g. "team/app".
	Repository string
	// Tag is empty when the reference is by digest only.
	Tag string
	// Digest, when set, wins over Tag.
	Digest digest.Digest
}

// ParseRef parses "host/repo[:tag][@digest]". Docker-style defaults apply
// to bare names ("app" is "docker.io/library/app:latest"); without tag and
// digest the tag is "latest".
func ParseRef(s string) (Ref, error) {
	named, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		return Ref{}, fmt.Errorf("parse image reference %q: %w", s, err)
	}
	r := Ref{Host: reference.Domain(named), Repository: reference.Path(named)}
	if t, ok := named.(reference.Tagged); ok {
		r.Tag = t.Tag()
	}
	if d, ok := named.(reference.Digested); ok {
		r.Digest = d.Digest()
	}
	if r.Tag == "" && r.Digest == "" {
		r.Tag = "latest"
	}
	return r, nil
}

// Name is "host/repository".
func (r Ref) Name() string { return r.Host + "/" + r.Repository }

// String is "host/repository[:tag][@digest]".
func (r Ref) String() string {
	s := r.Name()
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	if r.Digest != "" {
		s += "@" + r.Digest.String()
	}
	return s
}

// reference is what the registry API is asked for: the digest if known,
// else the tag.
func (r Ref) reference() string {
	if r.Digest != "" {
		return r.Digest.String()
	}
	return r.Tag
}

// WithDigest returns r pinned to d (the tag is kept for display).
func (r Ref) WithDigest(d digest.Digest) Ref {
	r.Digest = d
	return r
}
