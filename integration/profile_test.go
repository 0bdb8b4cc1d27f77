package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/integration/harness"
)

// profileNode is a node whose snapshotter serves its metrics API (and so
// /profile) on a unix socket.
func profileNode(t *testing.T) (*node, string) {
	t.Helper()
	n := startNode(t)
	sock := filepath.Join(n.dir, "metrics.sock")
	n.cfg.MetricsAddress = sock
	n.reconfigure(t)
	// containerd's proxy connection to the restarted daemon may fail its
	// first call: wait until a call through it succeeds.
	cl := n.cd.Client(t)
	ctx := namespaces.WithNamespace(testContext(t, 30*time.Second), harness.CRINamespace)
	if err := harness.WaitFor(ctx, nil, "containerd to reach the restarted snapshotter", func(ctx context.Context) error {
		// Walk reads containerd's metadata only; Stat asks the daemon.
		sn := cl.SnapshotService("streamer")
		var key string
		if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error { key = i.Name; return nil }); err != nil {
			return err
		}
		if key == "" {
			return nil // nothing to ask about: the pause image is not there
		}
		_, err := sn.Usage(ctx, key)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return n, sock
}

// nodeProfile reads GET /profile?image= from the snapshotter's socket.
func nodeProfile(ctx context.Context, sock, image string) ([]string, map[string][]artifact.Range, error) {
	client := harness.UnixHTTPClient(sock)
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://snapshotter/profile?image="+url.QueryEscape(image), nil)
	if err != nil {
		return nil, nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("GET /profile: %s: %s", resp.Status, b)
	}
	var p struct {
		Image  string                      `json:"image"`
		Files  []string                    `json:"files"`
		Ranges map[string][]artifact.Range `json:"ranges"`
	}
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, nil, err
	}
	if p.Image != image {
		return nil, nil, fmt.Errorf("profile of %q answered for %q", image, p.Image)
	}
	return p.Files, p.Ranges, nil
}

// prefetchOf returns the prefetch lists of every layer of the image's only
// streaming artifact, joined as absolute paths, and their ranges.
func prefetchOf(t *testing.T, ctx context.Context, n *node, repo string, img harness.BuiltImage) ([]string, map[string][]artifact.Range) {
	t.Helper()
	art := n.artifactOf(t, ctx, repo, img)
	c, err := fetcher.New(fetcher.Options{DockerConfig: filepath.Join(t.TempDir(), "none.json"), Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ref, err := fetcher.ParseRef(n.reg.Ref(repo, ":v1"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	ranges := map[string][]artifact.Range{}
	for _, l := range art.Layers {
		rc, err := c.FetchBlob(ctx, ref, ocispec.Descriptor{MediaType: l.TOC.MediaType, Digest: l.TOC.Digest, Size: l.TOC.Size})
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		toc, err := artifact.DecodeTOC(bytes.NewReader(b), artifact.Limits{})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range toc.Prefetch {
			out = append(out, "/"+p)
		}
		for _, fr := range toc.PrefetchRanges {
			ranges["/"+fr.Name] = fr.Ranges
		}
	}
	return out, ranges
}

// listPaths returns the paths of a prefetch list's lines (each a path,
// maybe followed by a tab and its ranges), and the lines with ranges.
func listPaths(text string) (paths []string, ranged map[string]string) {
	ranged = map[string]string{}
	for _, l := range strings.Split(text, "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		p, rs, ok := strings.Cut(l, "\t")
		paths = append(paths, p)
		if ok {
			ranged[p] = rs
		}
	}
	return paths, ranged
}

func containsAll(have []string, want ...string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}

// TestNodeStartupProfile: a pod of a streamed image leaves a startup
// profile on the node (the httpd binary, the page it served, the part of a
// large file it served to a range request, as that part); `streamer
// profile` prints it and `streamer create --prefetch-list` writes it into a
// new artifact revision whose TOCs list those files and that part.
func TestNodeStartupProfile(t *testing.T) {
	n, sock := profileNode(t)
	ctx := testContext(t, 3*time.Minute)
	const bigSize, partAt = 8 << 20, 5<<20 + 1000
	web, err := harness.WebImage("profiled page", 0, []harness.File{
		harness.Dir("data", 0o755), harness.Reg("data/unread", 0o644, harness.RandomBytes(91, 1<<20)),
		harness.Dir("www", 0o755), harness.Reg("www/big.bin", 0o644, harness.RandomBytes(92, bigSize)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ref, img := n.push(t, ctx, "profiled", web, true)
	before := n.artifactOf(t, ctx, "profiled", img)
	w := n.cri.RunWebPod(t, ctx, "profiled", ref, filepath.Join(n.dir, "logs"))
	if body, err := harness.HTTPGet(ctx, w.URL); err != nil || body != "profiled page" {
		t.Fatalf("GET %s: %q, %v", w.URL, body, err)
	}
	// A range request: httpd reads that part of big.bin only.
	if err := rangeGet(ctx, w.URL+"big.bin", partAt, 100); err != nil {
		t.Fatal(err)
	}
	files, ranges, err := nodeProfile(ctx, sock, ref)
	if err != nil {
		n.logs(t)
		t.Fatal(err)
	}
	t.Logf("profile of %s: %q, ranges %v", ref, files, ranges)
	part := ranges["/www/big.bin"]
	if !slices.Contains(files, "/www/big.bin") || len(part) == 0 || part[0].Offset > partAt || part[len(part)-1].End() < partAt+100 {
		t.Fatalf("profile ranges of /www/big.bin %v, want the part at %d", part, partAt)
	}
	var partBytes int64
	for _, r := range part {
		partBytes += r.Size
	}
	if partBytes >= bigSize/2 {
		t.Errorf("profile ranges of /www/big.bin %v: %d bytes of %d for a 100-byte range request", part, partBytes, bigSize)
	}
	if !containsAll(files, "/bin/busybox", "/www/index.html") || slices.Contains(files, "/data/unread") {
		t.Fatalf("profile %q: want /bin/busybox and /www/index.html, not the unread file", files)
	}
	// The runtime reads /etc/passwd and /etc/group while creating the
	// container; httpd's binary comes before the page it serves.
	if slices.Index(files, "/bin/busybox") > slices.Index(files, "/www/index.html") {
		t.Errorf("profile %q: the page before the httpd binary", files)
	}

	res := streamer(t, ctx, nil, "profile", "--address", sock, "--image", ref)
	printed, ranged := listPaths(res.Stdout)
	if res.Code != 0 || !slices.Equal(printed, files) || len(ranged) != len(ranges) || ranged["/www/big.bin"] == "" {
		t.Fatalf("streamer profile: %s; want %q with ranges of %d files, /www/big.bin among them", res, files, len(ranges))
	}
	list := filepath.Join(t.TempDir(), "list.txt")
	if err := os.WriteFile(list, []byte(res.Stdout), 0o644); err != nil {
		t.Fatal(err)
	}
	if res := streamer(t, ctx, nil, "create", "--prefetch-list", list, ref); res.Code != 0 {
		t.Fatalf("streamer create --prefetch-list: %s", res)
	}
	// artifactOf insists on exactly one artifact: the old revision is gone.
	after := n.artifactOf(t, ctx, "profiled", img)
	if !after.Created.After(before.Created) {
		t.Errorf("new revision created %v, not after %v", after.Created, before.Created)
	}
	for i := range after.Layers {
		if after.Layers[i].Blob.Digest != before.Layers[i].Blob.Digest {
			t.Errorf("layer %d: streaming blob changed", i)
		}
	}
	got, gotRanges := prefetchOf(t, ctx, n, "profiled", img)
	if !containsAll(got, files...) || len(got) != len(files) {
		t.Errorf("TOC prefetch lists %q, want the profile %q", got, files)
	}
	if !slices.Equal(gotRanges["/www/big.bin"], part) {
		t.Errorf("TOC prefetch ranges of /www/big.bin %v, want the profile's %v", gotRanges["/www/big.bin"], part)
	}
	if res := streamer(t, ctx, nil, "profile", "--address", sock, "--image", n.reg.Ref("never", ":v1")); res.Code == 0 {
		t.Errorf("streamer profile of an image never run: %s; want an error", res)
	}
}

// TestNodeRecord: `streamer record --ready-http` runs the image through
// containerd until its page answers, and writes the files it read into its
// artifact.
func TestNodeRecord(t *testing.T) {
	n, sock := profileNode(t)
	ctx := testContext(t, 3*time.Minute)
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	web, err := harness.WebImage("recorded page", port)
	if err != nil {
		t.Fatal(err)
	}
	ref, img := n.push(t, ctx, "recorded", web, true)
	out := filepath.Join(t.TempDir(), "recorded.txt")
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	res := streamer(t, ctx, nil, "record", ref, "--address", n.cd.Address, "--snapshotter-address", sock,
		"--ready-http", url, "--prefetch-list-out", out, "--timeout", "90s")
	if res.Code != 0 {
		n.logs(t)
		t.Fatalf("streamer record: %s", res)
	}
	t.Logf("streamer record: %s", strings.TrimSpace(res.Stderr))
	if !strings.Contains(res.Stdout, "revised") {
		t.Errorf("streamer record printed %q, want a revised artifact", res.Stdout)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	files, _ := listPaths(string(b))
	if !containsAll(files, "/bin/busybox", "/www/index.html") {
		t.Fatalf("recorded list %q: want /bin/busybox and /www/index.html", files)
	}
	if got, _ := prefetchOf(t, ctx, n, "recorded", img); len(got) != len(files) || !containsAll(got, files...) {
		t.Errorf("TOC prefetch lists %q, want the recorded %q", got, files)
	}
	// The recording container is gone: the port is free again.
	if _, err := harness.HTTPGet(ctx, url); err == nil {
		t.Errorf("%s still answers after streamer record", url)
	}
}

// rangeGet asks url for n bytes from off and checks the answer is those n
// bytes (206 Partial Content).
func rangeGet(ctx context.Context, url string, off, n int64) error {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(cctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s (range %d+%d): %w", url, off, n, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusPartialContent || int64(len(b)) != n {
		return fmt.Errorf("GET %s (range %d+%d): %s, %d bytes, %v; want 206 and %d bytes", url, off, n, resp.Status, len(b), err, n)
	}
	return nil
}
