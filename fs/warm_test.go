package fs_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestManagerFetchesTOCsAhead: mounting an image's first streamed layer
// fetches the TOCs of its other layers in the background, so their mounts
// (containerd prepares layers one after another) make no request; a TOC
// fetched ahead is recorded on disk only when its layer mounts.
func TestManagerFetchesTOCsAhead(t *testing.T) {
	e := newManagerEnv(t)
	var layers []craftedLayer
	var want []files
	for i := range 3 {
		f := files{fmt.Sprintf("app/layer%d.txt", i): randomBytes(uint64(90+i), 10<<10)}
		want = append(want, f)
		tb := f.tar(t)
		layers = append(layers, craftedLayer{imageTar: tb, artTar: tb})
	}
	imgs := pushLayers(t, e.client, e.proxy.Host, "test/warm", layers)
	m := e.manager(t)
	tocPaths := map[digest.Digest]string{}
	before := e.proxy.Paths()
	managerMount(t, m, imgs[0].labels())
	// The first mount fetched its TOC; the other two come in the background.
	deadline := time.Now().Add(10 * time.Second)
	for countTOCGets(e.proxy.Paths()[len(before):], tocPaths) < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("TOCs of the other layers not fetched ahead within 10 s; requests: %v", e.proxy.Paths()[len(before):])
		}
		time.Sleep(20 * time.Millisecond)
	}
	records := func() []string {
		ents, _ := os.ReadDir(filepath.Join(e.root, "layers", "layers"))
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		return names
	}
	if got := records(); len(got) != 1 || !strings.HasPrefix(got[0], imgs[0].layer.Encoded()) {
		t.Errorf("records on disk before the other layers mount: %v; want only the mounted layer's", got)
	}
	n := e.proxy.Requests()
	dir1 := managerMount(t, m, imgs[1].labels())
	if got := e.proxy.Requests() - n; got != 0 {
		t.Errorf("mounting the second layer made %d requests (%v); want none, its TOC was fetched ahead", got, e.proxy.Paths()[len(e.proxy.Paths())-int(got):])
	}
	if got := records(); len(got) != 2 {
		t.Errorf("records on disk after the second layer mounted: %v; want two", got)
	}
	readAll(t, dir1, want[1])
}

// countTOCGets counts the distinct blobs fetched whole (GET of a blob path
// once) among paths: the TOCs, the layers' blobs being read by range later.
func countTOCGets(paths []string, seen map[digest.Digest]string) int {
	for _, p := range paths {
		i := strings.Index(p, "/blobs/")
		if i < 0 {
			continue
		}
		d, err := digest.Parse(p[i+len("/blobs/"):])
		if err == nil {
			seen[d] = p
		}
	}
	return len(seen)
}
