package converter

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestLayerIndex(t *testing.T) {
	ctx := testContext(t)
	dir := t.TempDir()
	layer := digest.FromString("layer")
	entry := func(host, repo string) indexEntry {
		return indexEntry{Host: host, Repository: repo, ChunkSize: testChunk, Blob: ocispec.Descriptor{Digest: digest.FromString(repo)}}
	}

	idx := openIndex(ctx, dir)
	idx.record(ctx, layer, entry("r1", "a"))
	idx.record(ctx, layer, entry("r1", "b"))
	idx.record(ctx, layer, entry("r2", "c"))
	idx.record(ctx, layer, entry("r1", "a")) // replaces the first

	again := openIndex(ctx, dir)
	got := again.lookup(layer, "r1", "b")
	if len(got) != 2 || got[0].Repository != "b" || got[1].Repository != "a" {
		t.Fatalf("lookup from r1/b = %+v, want b (same repository) then a (mountable); r2 never", got)
	}
	if got := again.lookup(digest.FromString("other"), "r1", "b"); len(got) != 0 {
		t.Errorf("lookup of an unknown layer = %+v", got)
	}
	if n := len(again.Layers[layer]); n != 3 {
		t.Errorf("%d entries recorded, want 3 (one per repository)", n)
	}

	// A corrupt index is a lost hint, not an error.
	if err := os.WriteFile(filepath.Join(dir, indexFile), []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := openIndex(ctx, dir).lookup(layer, "r1", "a"); len(got) != 0 {
		t.Errorf("corrupt index gave %+v", got)
	}
	// "-" disables it.
	off := openIndex(ctx, "-")
	off.record(ctx, layer, entry("r1", "a"))
	if off.path != "" {
		t.Errorf("disabled index has a path %q", off.path)
	}
}
