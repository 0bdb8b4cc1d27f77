package artifact

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the committed fuzz seed corpora under testdata/fuzz")

// fuzzLimits keep each fuzz input cheap; the rules are the same as with
// the defaults.
var fuzzLimits = Limits{MaxTOCBytes: 4 << 20, MaxEntries: 10_000, MaxChunks: 10_000}

func FuzzDecodeTOC(f *testing.F) {
	for _, s := range tocSeeds(f) {
		f.Add(s.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		toc, err := DecodeTOC(bytes.NewReader(data), fuzzLimits)
		if err != nil {
			if toc != nil {
				t.Fatalf("DecodeTOC returned a TOC with error %v", err)
			}
			return
		}
		// What was accepted must hold the guarantees Validate documents.
		if err := toc.Validate(fuzzLimits); err != nil {
			t.Fatalf("accepted TOC fails Validate: %v", err)
		}
		for i, e := range toc.Entries {
			if !filepath.IsLocal(e.Name) {
				t.Fatalf("entry %d name %q escapes the root", i, e.Name)
			}
			if e.Type == TypeReg && e.Size > 0 {
				first, last := toc.ChunkRange(e.Offset, e.Size)
				if first >= last || toc.Chunks[first].Offset != e.Offset ||
					toc.Chunks[last-1].Offset+toc.Chunks[last-1].Size < e.Offset+e.Size {
					t.Fatalf("entry %d data [%d,+%d) not covered by chunks [%d,%d)", i, e.Offset, e.Size, first, last)
				}
			}
		}
		b, _, err := toc.Marshal()
		if err != nil {
			t.Fatalf("Marshal accepted TOC: %v", err)
		}
		again, err := DecodeTOC(bytes.NewReader(b), fuzzLimits)
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		j1, _ := json.Marshal(toc)
		j2, _ := json.Marshal(again)
		if !bytes.Equal(j1, j2) {
			t.Fatalf("round trip changed the TOC")
		}
	})
}

// FuzzTOCJSON fuzzes the JSON inside the zstd frame: mutating compressed
// bytes rarely yields valid zstd, so FuzzDecodeTOC alone would barely reach
// validation.
func FuzzTOCJSON(f *testing.F) {
	s := newSample(f)
	valid, err := json.Marshal(s.toc)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add([]byte(`{"version":1,"entries":[{"name":"../x","type":"reg"}]}`))
	f.Add(bytes.Replace(valid, []byte(`"run/fifo"`), []byte(`"etc/passwd/x"`), 1))
	f.Add(bytes.Replace(valid, []byte(`"linkname":"bin/sh"`), []byte(`"linkname":"bin/busybox"`), 1))
	f.Fuzz(func(t *testing.T, doc []byte) {
		toc, err := DecodeTOC(bytes.NewReader(zstdJSON(t, string(doc))), fuzzLimits)
		if err != nil {
			return
		}
		for i, e := range toc.Entries {
			if !filepath.IsLocal(e.Name) {
				t.Fatalf("entry %d name %q escapes the root", i, e.Name)
			}
			if e.Type == TypeHardlink {
				j := slices.IndexFunc(toc.Entries[:i], func(x Entry) bool { return x.Name == e.Linkname })
				if j < 0 || toc.Entries[j].Type != TypeReg {
					t.Fatalf("entry %d hardlink to %q is not an earlier regular file", i, e.Linkname)
				}
			}
		}
	})
}

func FuzzParseManifest(f *testing.F) {
	for _, s := range manifestSeeds(f) {
		f.Add(s.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := ParseManifest(data)
		if err != nil {
			return
		}
		// A parsed manifest rebuilds into one that parses to the same.
		b, err := BuildManifest(m.Subject, m.Layers, m.Created)
		if err != nil {
			t.Fatalf("BuildManifest of a parsed manifest: %v", err)
		}
		m2, err := ParseManifest(b)
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if len(m2.Layers) != len(m.Layers) || !m2.Created.Equal(m.Created) || m2.Subject.Digest != m.Subject.Digest {
			t.Fatalf("round trip changed the manifest")
		}
	})
}

type seed struct {
	name string
	data []byte
}

func tocSeeds(tb testing.TB) []seed {
	tb.Helper()
	s := newSample(tb)
	marshal := func(t *TOC) []byte {
		b, _, err := t.Marshal()
		if err != nil {
			tb.Fatalf("Marshal: %v", err)
		}
		return b
	}
	mutated := func(mutate func(*TOC)) []byte {
		t := cloneTOC(s.toc)
		mutate(t)
		return marshal(t)
	}
	return []seed{
		{"valid", marshal(s.toc)},
		{"traversal", mutated(func(t *TOC) { t.Entries[9].Name = "../../etc/shadow" })},
		{"absolute", mutated(func(t *TOC) { t.Entries[9].Name = "/etc/shadow" })},
		{"duplicate", mutated(func(t *TOC) { t.Entries[9].Name = "etc/passwd" })},
		{"below-file", mutated(func(t *TOC) { t.Entries[9].Name = "etc/passwd/x" })},
		{"hardlink-cycle", mutated(func(t *TOC) {
			t.Entries = append(t.Entries,
				Entry{Name: "x", Type: TypeHardlink, Linkname: "y"},
				Entry{Name: "y", Type: TypeHardlink, Linkname: "x"})
		})},
		{"absurd-sizes", mutated(func(t *TOC) {
			t.TarSize = 1 << 62
			t.Entries[1].Size = 1<<63 - 1
		})},
		{"huge-counts", zstdJSON(tb, `{"version":1,"entries":[`+strings.Repeat(`{},`, 200_000)+`{}]}`)},
		{"huge-chunks", zstdJSON(tb, `{"version":1,"chunks":[`+strings.Repeat(`{"size":1},`, 100_000)+`{}]}`)},
		{"zstd-bomb", zstdJSON(tb, strings.Repeat(" ", 16<<20)+`{}`)},
		{"zstd-bomb-stream", zstdStream(tb, strings.Repeat(" ", 16<<20)+`{}`)},
		{"not-zstd", []byte(`{"version":1}`)},
	}
}

func manifestSeeds(tb testing.TB) []seed {
	tb.Helper()
	valid := buildSample(tb)
	one, err := BuildManifest(ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString("i"), Size: 1},
		sampleLayers()[:1], time.Unix(0, 0))
	if err != nil {
		tb.Fatalf("BuildManifest: %v", err)
	}
	return []seed{
		{"valid", valid},
		{"one-layer", one},
		{"no-subject", bytes.Replace(valid, []byte(`"subject"`), []byte(`"subjekt"`), 1)},
		{"index", []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`)},
	}
}

// TestFuzzSeedCorpus checks that the committed seed corpora are present and
// current; run with -update-seeds to rewrite them.
func TestFuzzSeedCorpus(t *testing.T) {
	for fuzzer, seeds := range map[string][]seed{
		"FuzzDecodeTOC":     tocSeeds(t),
		"FuzzParseManifest": manifestSeeds(t),
	} {
		dir := filepath.Join("testdata", "fuzz", fuzzer)
		for _, s := range seeds {
			p := filepath.Join(dir, s.name)
			want := fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", s.data)
			if *updateSeeds {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, want, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			if _, err := os.Stat(p); err != nil {
				t.Errorf("seed %s missing (run go test -run TestFuzzSeedCorpus -update-seeds): %v", p, err)
			}
		}
	}
	// The valid seeds must stay valid: otherwise the fuzzer starts from junk.
	s := tocSeeds(t)[0]
	if _, err := DecodeTOC(bytes.NewReader(s.data), fuzzLimits); err != nil {
		t.Errorf("valid TOC seed rejected: %v", err)
	}
	if _, err := ParseManifest(manifestSeeds(t)[0].data); err != nil {
		t.Errorf("valid manifest seed rejected: %v", err)
	}
}
