package artifact

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// FormatVersion is the value of AnnotationVersion this package writes and
// reads.
const FormatVersion = "1"

// MaxManifestBytes bounds a manifest ParseManifest accepts; registries
// refuse larger manifests anyway.
const MaxManifestBytes = 4 << 20

// EmptyConfigBytes is the artifact manifest's config blob: the OCI empty
// JSON object. Push it before the manifest.
var EmptyConfigBytes = []byte("{}")

// emptyConfigDigest is the sha256 of EmptyConfigBytes.
const emptyConfigDigest = digest.Digest("sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a")

// EmptyConfig returns the descriptor of EmptyConfigBytes, without the
// inline data field so that the manifest stays minimal.
func EmptyConfig() ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: MediaTypeConfig, Digest: emptyConfigDigest, Size: int64(len(EmptyConfigBytes))}
}

// Manifest is a parsed streaming artifact manifest.
type Manifest struct {
	// Subject is the image manifest the artifact was made from.
	Subject ocispec.Descriptor
	// Created is when the artifact was made; the newest artifact wins.
	Created time.Time
	// Layers are in the image's layer order.
	Layers []Layer
}

// Layer returns the streaming layer made from the original layer digest.
func (m *Manifest) Layer(original digest.Digest) (Layer, bool) {
	for _, l := range m.Layers {
		if l.Original == original {
			return l, true
		}
	}
	return Layer{}, false
}

// BuildManifest returns the OCI image manifest of a streaming artifact
// for subject, with each layer as a streaming blob descriptor followed by
// its TOC descriptor. Empty media types in layers take the defaults.
func BuildManifest(subject ocispec.Descriptor, layers []Layer, created time.Time) ([]byte, error) {
	if err := checkSubject(subject); err != nil {
		return nil, fmt.Errorf("build manifest: %w", err)
	}
	if len(layers) == 0 {
		return nil, fmt.Errorf("build manifest: no layers")
	}
	descs := make([]ocispec.Descriptor, 0, 2*len(layers))
	for i, l := range layers {
		if l.Blob.MediaType == "" {
			l.Blob.MediaType = MediaTypeStreamingLayer
		}
		if l.TOC.MediaType == "" {
			l.TOC.MediaType = MediaTypeTOC
		}
		if err := checkLayer(l); err != nil {
			return nil, fmt.Errorf("build manifest: layer %d: %w", i, err)
		}
		descs = append(descs,
			ocispec.Descriptor{
				MediaType: l.Blob.MediaType,
				Digest:    l.Blob.Digest,
				Size:      l.Blob.Size,
				Annotations: map[string]string{
					AnnotationLayer:  l.Original.String(),
					AnnotationDiffID: l.DiffID.String(),
					AnnotationTOC:    l.TOC.Digest.String(),
				},
			},
			ocispec.Descriptor{
				MediaType:   l.TOC.MediaType,
				Digest:      l.TOC.Digest,
				Size:        l.TOC.Size,
				Annotations: map[string]string{AnnotationLayer: l.Original.String()},
			})
	}
	subj := ocispec.Descriptor{MediaType: subject.MediaType, Digest: subject.Digest, Size: subject.Size}
	m := ocispec.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: ArtifactType,
		Config:       EmptyConfig(),
		Layers:       descs,
		Subject:      &subj,
		Annotations: map[string]string{
			AnnotationCreated: created.UTC().Format(time.RFC3339Nano),
			AnnotationVersion: FormatVersion,
		},
	}
	b, err := json.Marshal(&m)
	if err != nil {
		return nil, fmt.Errorf("build manifest: %w", err)
	}
	return b, nil
}

// ParseManifest decodes and validates a streaming artifact manifest. Every
// failure wraps ErrInvalidManifest.
func ParseManifest(b []byte) (*Manifest, error) {
	if len(b) > MaxManifestBytes {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrInvalidManifest, len(b), MaxManifestBytes)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: decode JSON: %v", ErrInvalidManifest, err)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidManifest}, args...)...)
	}
	if m.SchemaVersion != 2 {
		return nil, bad("schemaVersion %d, want 2", m.SchemaVersion)
	}
	if m.MediaType != ocispec.MediaTypeImageManifest {
		return nil, bad("mediaType %q, want %q", short(m.MediaType), ocispec.MediaTypeImageManifest)
	}
	if m.ArtifactType != ArtifactType {
		return nil, bad("artifactType %q, want %q", short(m.ArtifactType), ArtifactType)
	}
	if m.Config.MediaType != MediaTypeConfig || m.Config.Digest != emptyConfigDigest || m.Config.Size != int64(len(EmptyConfigBytes)) {
		return nil, bad("config is not the OCI empty descriptor")
	}
	if m.Subject == nil {
		return nil, bad("no subject")
	}
	if err := checkSubject(*m.Subject); err != nil {
		return nil, bad("subject: %v", err)
	}
	if v := m.Annotations[AnnotationVersion]; v != FormatVersion {
		return nil, bad("format version %q, want %q", short(v), FormatVersion)
	}
	created, err := time.Parse(time.RFC3339Nano, m.Annotations[AnnotationCreated])
	if err != nil {
		return nil, bad("annotation %s: %v", AnnotationCreated, err)
	}
	if len(m.Layers) == 0 || len(m.Layers)%2 != 0 {
		return nil, bad("%d layer descriptors, want a positive even number (blob, TOC pairs)", len(m.Layers))
	}
	out := &Manifest{
		Subject: ocispec.Descriptor{MediaType: m.Subject.MediaType, Digest: m.Subject.Digest, Size: m.Subject.Size},
		Created: created,
		Layers:  make([]Layer, 0, len(m.Layers)/2),
	}
	for i := 0; i < len(m.Layers); i += 2 {
		blob, toc := m.Layers[i], m.Layers[i+1]
		if blob.MediaType != MediaTypeStreamingLayer {
			return nil, bad("layer %d: descriptor %d has media type %q, want %q", i/2, i, short(blob.MediaType), MediaTypeStreamingLayer)
		}
		if toc.MediaType != MediaTypeTOC {
			return nil, bad("layer %d: descriptor %d has media type %q, want %q", i/2, i+1, short(toc.MediaType), MediaTypeTOC)
		}
		l := Layer{
			Original: digest.Digest(blob.Annotations[AnnotationLayer]),
			DiffID:   digest.Digest(blob.Annotations[AnnotationDiffID]),
			Blob:     Descriptor{MediaType: blob.MediaType, Digest: blob.Digest, Size: blob.Size},
			TOC:      Descriptor{MediaType: toc.MediaType, Digest: toc.Digest, Size: toc.Size},
		}
		if err := checkLayer(l); err != nil {
			return nil, bad("layer %d: %v", i/2, err)
		}
		if got := blob.Annotations[AnnotationTOC]; got != toc.Digest.String() {
			return nil, bad("layer %d: blob names TOC %q, next descriptor is %s", i/2, short(got), toc.Digest)
		}
		if got := toc.Annotations[AnnotationLayer]; got != l.Original.String() {
			return nil, bad("layer %d: TOC names layer %q, blob names %s", i/2, short(got), l.Original)
		}
		out.Layers = append(out.Layers, l)
	}
	return out, nil
}

func checkSubject(d ocispec.Descriptor) error {
	if d.MediaType == "" {
		return errors.New("subject has no media type")
	}
	if err := d.Digest.Validate(); err != nil {
		return fmt.Errorf("subject digest %q: %v", short(string(d.Digest)), err)
	}
	if d.Size <= 0 {
		return fmt.Errorf("subject size %d", d.Size)
	}
	return nil
}

func checkLayer(l Layer) error {
	for _, c := range []struct {
		what string
		d    digest.Digest
	}{{"original layer", l.Original}, {"diffID", l.DiffID}, {"blob", l.Blob.Digest}, {"TOC", l.TOC.Digest}} {
		if err := validSHA256(c.d); err != nil {
			return fmt.Errorf("%s: %v", c.what, err)
		}
	}
	if l.Blob.MediaType != MediaTypeStreamingLayer {
		return fmt.Errorf("blob media type %q, want %q", short(l.Blob.MediaType), MediaTypeStreamingLayer)
	}
	if l.TOC.MediaType != MediaTypeTOC {
		return fmt.Errorf("TOC media type %q, want %q", short(l.TOC.MediaType), MediaTypeTOC)
	}
	if l.Blob.Size <= 0 || l.TOC.Size <= 0 {
		return fmt.Errorf("blob size %d, TOC size %d: want positive sizes", l.Blob.Size, l.TOC.Size)
	}
	return nil
}

// Select picks the artifact to use among an image's referrers (from the
// referrers API or the sha256-<hex> tag fallback index): descriptors whose
// artifactType is ArtifactType, the newest by AnnotationCreated, ties broken
// by the greatest digest so every node picks the same one. Descriptors with
// a missing or malformed creation time count as oldest.
func Select(referrers []ocispec.Descriptor) (ocispec.Descriptor, bool) {
	var (
		best     ocispec.Descriptor
		bestTime time.Time
		found    bool
	)
	for _, d := range referrers {
		if d.ArtifactType != ArtifactType {
			continue
		}
		ct, _ := time.Parse(time.RFC3339Nano, d.Annotations[AnnotationCreated])
		switch {
		case !found, ct.After(bestTime),
			ct.Equal(bestTime) && strings.Compare(d.Digest.String(), best.Digest.String()) > 0:
			best, bestTime, found = d, ct, true
		}
	}
	return best, found
}

// TagFallback returns the tag under which registries without the referrers
// API list the referrers of subject (OCI distribution spec tag schema).
func TagFallback(subject digest.Digest) string {
	return strings.Replace(subject.String(), ":", "-", 1)
}
