package integration

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/integration/harness"
)

// TestStreamerPull pulls through containerd with `streamer pull`, as a ctr
// user would. A plain image is unpacked; a converted image sharing its base
// layers with it mixes both: the base already unpacked locally, the layers
// above it streamed.
func TestStreamerPull(t *testing.T) {
	forEachContainerd(t, func(t *testing.T, rt harness.ContainerdRuntime) {
		n := startNodeOn(t, rt)
		ctx := testContext(t, 3*time.Minute)
		unpacked := map[digest.Digest]bool{}
		for i, tc := range []struct {
			repo    string
			convert bool
		}{
			{"pulled-plain", false},
			{"pulled-streamed", true},
		} {
			web, err := harness.WebImage(tc.repo, 0, []harness.File{harness.Reg("data/f", 0o644, harness.RandomBytes(int64(70+i), 1<<20))})
			if err != nil {
				t.Fatal(err)
			}
			ref, img := n.push(t, ctx, tc.repo, web, tc.convert)
			res := streamer(t, ctx, nil, "pull", "--address", n.cd.Address, "--namespace", "default", ref)
			if res.Code != 0 {
				n.logs(t)
				t.Fatalf("streamer pull %s: %s", ref, res)
			}
			streamed := 0
			for _, l := range img.Layers {
				if tc.convert && !unpacked[l.Digest] {
					streamed++
				}
				unpacked[l.Digest] = true
			}
			if tc.convert && (streamed == 0 || streamed == len(img.Layers)) {
				t.Fatalf("test image %s shares %d of %d layers with the plain one; want a mix", tc.repo, len(img.Layers)-streamed, len(img.Layers))
			}
			want := fmt.Sprintf("layers: %d streamed, %d unpacked", streamed, len(img.Layers)-streamed)
			if !strings.Contains(res.Stdout, want) {
				n.logs(t)
				t.Fatalf("streamer pull %s output %q, want it to say %q", tc.repo, res.Stdout, want)
			}
		}
	})
}
