package artifact

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func sampleLayers() []Layer {
	var ls []Layer
	for _, n := range []string{"one", "two"} {
		ls = append(ls, Layer{
			Original: digest.FromString("orig-" + n),
			DiffID:   digest.FromString("diff-" + n),
			Blob:     Descriptor{MediaType: MediaTypeStreamingLayer, Digest: digest.FromString("blob-" + n), Size: 1234},
			TOC:      Descriptor{MediaType: MediaTypeTOC, Digest: digest.FromString("toc-" + n), Size: 56},
		})
	}
	return ls
}

func sampleSubject() ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString("image"), Size: 789}
}

func buildSample(tb testing.TB) []byte {
	tb.Helper()
	created := time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.FixedZone("x", 3600))
	b, err := BuildManifest(sampleSubject(), sampleLayers(), created)
	if err != nil {
		tb.Fatalf("BuildManifest: %v", err)
	}
	return b
}

func TestManifestRoundTrip(t *testing.T) {
	b := buildSample(t)
	m, err := ParseManifest(b)
	if err != nil {
		t.Fatalf("ParseManifest: %v\n%s", err, b)
	}
	if !reflect.DeepEqual(m.Layers, sampleLayers()) {
		t.Errorf("layers: got %+v, want %+v", m.Layers, sampleLayers())
	}
	if !reflect.DeepEqual(m.Subject, sampleSubject()) {
		t.Errorf("subject: got %+v, want %+v", m.Subject, sampleSubject())
	}
	if want := time.Date(2024, 5, 6, 6, 8, 9, 123456789, time.UTC); !m.Created.Equal(want) {
		t.Errorf("created %v, want %v", m.Created, want)
	}
	l, ok := m.Layer(digest.FromString("orig-two"))
	if !ok || l.TOC.Digest != digest.FromString("toc-two") {
		t.Errorf("Layer(orig-two) = %+v, %v", l, ok)
	}
	if _, ok := m.Layer(digest.FromString("nope")); ok {
		t.Errorf("Layer found a layer that is not there")
	}

	// The wire shape other tools (oras, skopeo, registries) see.
	var raw struct {
		SchemaVersion int                  `json:"schemaVersion"`
		MediaType     string               `json:"mediaType"`
		ArtifactType  string               `json:"artifactType"`
		Config        json.RawMessage      `json:"config"`
		Layers        []ocispec.Descriptor `json:"layers"`
		Subject       *ocispec.Descriptor  `json:"subject"`
		Annotations   map[string]string    `json:"annotations"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatalf("unmarshal: %v", err)
	}
	if raw.SchemaVersion != 2 || raw.MediaType != ocispec.MediaTypeImageManifest || raw.ArtifactType != ArtifactType {
		t.Errorf("header: %d %q %q", raw.SchemaVersion, raw.MediaType, raw.ArtifactType)
	}
	wantConfig := `{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}`
	if string(raw.Config) != wantConfig {
		t.Errorf("config %s, want %s", raw.Config, wantConfig)
	}
	if digest.FromBytes(EmptyConfigBytes) != EmptyConfig().Digest {
		t.Errorf("EmptyConfig digest does not match EmptyConfigBytes")
	}
	if len(raw.Layers) != 4 || raw.Layers[0].Annotations[AnnotationTOC] != raw.Layers[1].Digest.String() ||
		raw.Layers[1].Annotations[AnnotationLayer] != digest.FromString("orig-one").String() {
		t.Errorf("layers: %+v", raw.Layers)
	}
	if raw.Subject == nil || raw.Subject.Digest != digest.FromString("image") {
		t.Errorf("subject: %+v", raw.Subject)
	}
	if got := raw.Annotations[AnnotationCreated]; got != "2024-05-06T06:08:09.123456789Z" {
		t.Errorf("created annotation %q is not RFC 3339 UTC", got)
	}
	if raw.Annotations[AnnotationVersion] != FormatVersion {
		t.Errorf("version annotation %q", raw.Annotations[AnnotationVersion])
	}
}

func TestBuildManifestRejects(t *testing.T) {
	tests := []struct {
		name    string
		subject func(*ocispec.Descriptor)
		layers  func([]Layer) []Layer
	}{
		{"no layers", nil, func([]Layer) []Layer { return nil }},
		{"subject without digest", func(d *ocispec.Descriptor) { d.Digest = "" }, nil},
		{"subject without media type", func(d *ocispec.Descriptor) { d.MediaType = "" }, nil},
		{"bad diffID", nil, func(l []Layer) []Layer { l[0].DiffID = "sha256:zz"; return l }},
		{"wrong blob media type", nil, func(l []Layer) []Layer { l[1].Blob.MediaType = "application/x"; return l }},
		{"zero TOC size", nil, func(l []Layer) []Layer { l[1].TOC.Size = 0; return l }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, l := sampleSubject(), sampleLayers()
			if tt.subject != nil {
				tt.subject(&s)
			}
			if tt.layers != nil {
				l = tt.layers(l)
			}
			if b, err := BuildManifest(s, l, time.Now()); err == nil {
				t.Fatalf("BuildManifest accepted: %s", b)
			}
		})
	}
}

func TestParseManifestRejects(t *testing.T) {
	type obj = map[string]any
	layer := func(m obj, i int) obj { return m["layers"].([]any)[i].(obj) }
	ann := func(d obj) obj { return d["annotations"].(obj) }
	tests := []struct {
		name   string
		mutate func(m obj)
		want   string
	}{
		{"schema version", func(m obj) { m["schemaVersion"] = 1 }, "schemaVersion"},
		{"media type", func(m obj) { m["mediaType"] = "application/vnd.oci.image.index.v1+json" }, "mediaType"},
		{"artifact type", func(m obj) { m["artifactType"] = "application/other" }, "artifactType"},
		{"no artifact type", func(m obj) { delete(m, "artifactType") }, "artifactType"},
		{"config", func(m obj) { m["config"].(obj)["size"] = 3 }, "config"},
		{"no subject", func(m obj) { delete(m, "subject") }, "no subject"},
		{"subject digest", func(m obj) { m["subject"].(obj)["digest"] = "sha256:1" }, "subject"},
		{"no version", func(m obj) { delete(ann(m), AnnotationVersion) }, "format version"},
		{"future version", func(m obj) { ann(m)[AnnotationVersion] = "2" }, "format version"},
		{"no created", func(m obj) { delete(ann(m), AnnotationCreated) }, AnnotationCreated},
		{"odd layers", func(m obj) { m["layers"] = m["layers"].([]any)[:3] }, "even"},
		{"no layers", func(m obj) { m["layers"] = []any{} }, "even"},
		{"pair swapped", func(m obj) {
			l := m["layers"].([]any)
			l[0], l[1] = l[1], l[0]
		}, "media type"},
		{"TOC media type", func(m obj) { layer(m, 3)["mediaType"] = MediaTypeStreamingLayer }, "media type"},
		{"blob digest", func(m obj) { layer(m, 2)["digest"] = "sha256:00" }, "blob"},
		{"TOC digest", func(m obj) { layer(m, 1)["digest"] = "sha384:00" }, "TOC"},
		{"missing layer annotation", func(m obj) { delete(ann(layer(m, 0)), AnnotationLayer) }, "original layer"},
		{"missing diffID annotation", func(m obj) { delete(ann(layer(m, 2)), AnnotationDiffID) }, "diffID"},
		{"TOC annotation mismatch", func(m obj) { ann(layer(m, 0))[AnnotationTOC] = digest.FromString("x").String() }, "names TOC"},
		{"TOC layer mismatch", func(m obj) { ann(layer(m, 3))[AnnotationLayer] = digest.FromString("x").String() }, "TOC names layer"},
		{"zero blob size", func(m obj) { layer(m, 0)["size"] = 0 }, "size"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var m obj
			if err := json.Unmarshal(buildSample(t), &m); err != nil {
				t.Fatalf("unmarshal: %v", err)
			}
			tt.mutate(m)
			b, err := json.Marshal(m)
			if err != nil {
				t.Fatalf("marshal: %v", err)
			}
			_, err = ParseManifest(b)
			if err == nil {
				t.Fatalf("ParseManifest accepted %s", b)
			}
			if !errors.Is(err, ErrInvalidManifest) {
				t.Errorf("error %v does not wrap ErrInvalidManifest", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
	for name, b := range map[string][]byte{"not JSON": []byte("{"), "too large": make([]byte, MaxManifestBytes+1)} {
		if _, err := ParseManifest(b); !errors.Is(err, ErrInvalidManifest) {
			t.Errorf("%s: error %v, want ErrInvalidManifest", name, err)
		}
	}
}

func TestSelect(t *testing.T) {
	ref := func(name, created, artifactType string) ocispec.Descriptor {
		d := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: artifactType, Digest: digest.Digest("sha256:" + strings.Repeat(name, 64)), Size: 1}
		if created != "" {
			d.Annotations = map[string]string{AnnotationCreated: created}
		}
		return d
	}
	tests := []struct {
		name string
		refs []ocispec.Descriptor
		want string // digest hex letter, "" for none
	}{
		{"none", nil, ""},
		{"other artifact types only", []ocispec.Descriptor{ref("a", "2024-01-01T00:00:00Z", "application/vnd.example.sbom")}, ""},
		{"newest wins", []ocispec.Descriptor{
			ref("a", "2024-01-01T00:00:00Z", ArtifactType),
			ref("b", "2024-03-01T00:00:00Z", ArtifactType),
			ref("c", "2024-02-01T00:00:00Z", ArtifactType),
			ref("d", "2025-01-01T00:00:00Z", "application/vnd.example.sbom"),
		}, "b"},
		{"tie broken by greatest digest", []ocispec.Descriptor{
			ref("c", "2024-01-01T00:00:00Z", ArtifactType),
			ref("e", "2024-01-01T00:00:00Z", ArtifactType),
			ref("d", "2024-01-01T00:00:00Z", ArtifactType),
		}, "e"},
		{"missing created is oldest", []ocispec.Descriptor{
			ref("f", "", ArtifactType),
			ref("a", "2020-01-01T00:00:00Z", ArtifactType),
		}, "a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := Select(tt.refs)
			if tt.want == "" {
				if ok {
					t.Fatalf("Select picked %s, want none", got.Digest)
				}
				return
			}
			if !ok || got.Digest.Encoded()[:1] != tt.want {
				t.Fatalf("Select = %s, %v; want digest of %q", got.Digest, ok, tt.want)
			}
		})
	}
}

func TestTagFallback(t *testing.T) {
	d := digest.FromString("image")
	if got, want := TagFallback(d), "sha256-"+d.Encoded(); got != want {
		t.Errorf("TagFallback = %q, want %q", got, want)
	}
}
