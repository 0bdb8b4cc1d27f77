package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/converter"
	"github.com/streamer-dev/streamer/fetcher"
	"github.com/streamer-dev/streamer/internal/testenv"
)

// execute runs the command line in-process as main does and returns its
// exit code, stdout and stderr.
func execute(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := newRootCmd(&stdout, &stderr)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(ctx)
	if err != nil {
		stderr.WriteString("streamer: " + oneLine(err) + "\n")
	}
	return exitCode(err), stdout.String(), stderr.String()
}

func TestExitCodes(t *testing.T) {
	cases := []struct {
		err  error
		want int
	}{
		{nil, 0},
		{errors.New("boom"), exitGeneric},
		{usageError{errors.New("bad flag")}, exitUsage},
		{fmt.Errorf("resolve x: %w", fetcher.ErrNotFound), exitNotFound},
		{fmt.Errorf("find: %w", fetcher.ErrNoArtifact), exitNotFound},
		{fmt.Errorf("auth: %w", fetcher.ErrUnauthorized), exitUnauthorized},
		{fmt.Errorf("dial: %w", fetcher.ErrUnreachable), exitUnreachable},
		{fmt.Errorf("blob: %w", artifact.ErrDigestMismatch), exitCorrupt},
		{fmt.Errorf("layer: %w", converter.ErrCorruptLayer), exitCorrupt},
		{fmt.Errorf("layer: %w", converter.ErrBadTar), exitCorrupt},
		{fmt.Errorf("toc: %w", artifact.ErrInvalidTOC), exitCorrupt},
		{fmt.Errorf("layer: %w", converter.ErrUnsupportedMediaType), exitUnsupported},
		{fmt.Errorf("manifest: %w", fetcher.ErrUnsupportedMediaType), exitUnsupported},
		{interrupted{fmt.Errorf("x: %w", context.Canceled)}, exitInterrupted},
		{interrupted{fmt.Errorf("x: %w", fetcher.ErrNotFound)}, exitInterrupted},
	}
	for _, tc := range cases {
		if got := exitCode(tc.err); got != tc.want {
			t.Errorf("exitCode(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

func TestUsageErrors(t *testing.T) {
	cases := []struct {
		name    string
		args    []string
		mention string
	}{
		{"no image", []string{"create"}, "accepts 1 arg"},
		{"two images", []string{"inspect", "a", "b"}, "accepts 1 arg"},
		{"unknown flag", []string{"create", "--bogus", "a"}, "unknown flag"},
		{"unknown command", []string{"frobnicate"}, "unknown command"},
		{"chunk size unit", []string{"create", "--chunk-size", "1MB", "a"}, "--chunk-size"},
		{"chunk size too small", []string{"create", "--chunk-size", "4KiB", "a"}, "64KiB to 64MiB"},
		{"chunk size too large", []string{"create", "--chunk-size", "1GiB", "a"}, "64KiB to 64MiB"},
		{"output", []string{"referrers", "--output", "yaml", "a"}, "--output"},
		{"files without layer", []string{"inspect", "--files", "a"}, "go together"},
		{"bad reference", []string{"create", "UPPER/Case:tag"}, "parse image reference"},
		{"log level", []string{"--log-level", "loud", "version"}, "--log-level"},
		{"missing config", []string{"create", "--config", "/nonexistent/streamer.toml", "127.0.0.1:1/a"}, "read config"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := execute(t, tc.args...)
			if code != exitUsage || !strings.Contains(stderr, tc.mention) {
				t.Fatalf("exit %d, stderr %q; want %d mentioning %q", code, stderr, exitUsage, tc.mention)
			}
			if strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
				t.Errorf("error is not one line: %q", stderr)
			}
		})
	}
}

func TestParseChunkSize(t *testing.T) {
	for in, want := range map[string]int64{"": 0, "1MiB": 1 << 20, "64KiB": 64 << 10, "4194304": 4 << 20, "64MiB": 64 << 20} {
		got, err := parseChunkSize(in)
		if err != nil || got != want {
			t.Errorf("parseChunkSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
}

func TestHelpDocumentsExitCodes(t *testing.T) {
	code, stdout, _ := execute(t, "--help")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{"Exit codes:", "130", "unsupported media type", "--insecure"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("--help lacks %q", want)
		}
	}
}

func TestVersion(t *testing.T) {
	code, stdout, _ := execute(t, "version")
	if code != 0 || !strings.HasPrefix(stdout, "streamer ") {
		t.Fatalf("version: exit %d, %q", code, stdout)
	}
}

// pushTestImage pushes a one-platform image of two gzip layers to ref and
// returns the layer tars.
func pushTestImage(t *testing.T, c *fetcher.Client, ref fetcher.Ref) [][]byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	push := func(mt string, b []byte) ocispec.Descriptor {
		d := ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(b), Size: int64(len(b))}
		if err := c.PushBlob(ctx, ref, d, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		return d
	}
	var tars [][]byte
	img := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}}
	var layers []ocispec.Descriptor
	for i := range 2 {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		tw.WriteHeader(&tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755})
		data := bytes.Repeat([]byte(fmt.Sprintf("layer %d ", i)), 20000)
		tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("etc/file%d", i), Typeflag: tar.TypeReg, Mode: 0o4755, Uid: 7, Gid: 8, Size: int64(len(data))})
		tw.Write(data)
		tw.WriteHeader(&tar.Header{Name: "etc/link", Typeflag: tar.TypeSymlink, Linkname: "file0", Mode: 0o777})
		tw.Close()
		tars = append(tars, buf.Bytes())
		img.RootFS.DiffIDs = append(img.RootFS.DiffIDs, digest.FromBytes(buf.Bytes()))
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		zw.Write(buf.Bytes())
		zw.Close()
		layers = append(layers, push(ocispec.MediaTypeImageLayerGzip, gz.Bytes()))
	}
	cb, _ := json.Marshal(img)
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: push(ocispec.MediaTypeImageConfig, cb), Layers: layers}
	mb, _ := json.Marshal(m)
	if _, err := c.PushManifest(ctx, ref, ocispec.MediaTypeImageManifest, mb, ref.Tag); err != nil {
		t.Fatal(err)
	}
	return tars
}

// TestCommandsAgainstRegistry runs create, referrers and inspect in-process
// against a real registry.
func TestCommandsAgainstRegistry(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	c, err := fetcher.New(fetcher.Options{DockerConfig: filepath.Join(t.TempDir(), "config.json")})
	if err != nil {
		t.Fatal(err)
	}
	image := reg.Host + "/cli/app:v1"
	ref, _ := fetcher.ParseRef(image)
	pushTestImage(t, c, ref)

	code, stdout, stderr := execute(t, "create", "--chunk-size", "64KiB", image)
	if code != 0 {
		t.Fatalf("create: exit %d: %s", code, stderr)
	}
	fields := strings.Fields(stdout)
	if len(fields) != 3 || fields[0] != "linux/amd64" || !strings.HasPrefix(fields[1], "sha256:") || fields[2] != "created" {
		t.Fatalf("create printed %q, want \"linux/amd64 <digest> created\"", stdout)
	}
	if !strings.Contains(stderr, "layer 1/2") || !strings.Contains(stderr, "done") {
		t.Errorf("create progress (not a terminal) = %q, want plain lines per layer", stderr)
	}
	artifactDigest := fields[1]

	code, stdout, _ = execute(t, "create", "--output", "json", image)
	var res resultJSONT
	if code != 0 || json.Unmarshal([]byte(strings.TrimSpace(stdout)), &res) != nil || !res.Existing || res.Artifact != artifactDigest {
		t.Fatalf("second create: exit %d, %q; want one JSON result with existing artifact %s", code, stdout, artifactDigest)
	}

	code, stdout, _ = execute(t, "referrers", image)
	if code != 0 || !strings.Contains(stdout, artifact.ArtifactType) || !strings.Contains(stdout, artifactDigest) {
		t.Fatalf("referrers: exit %d, %q", code, stdout)
	}
	code, stdout, _ = execute(t, "referrers", "-o", "json", image)
	var row referrerRow
	if code != 0 || json.Unmarshal([]byte(strings.Split(stdout, "\n")[0]), &row) != nil || row.Digest != artifactDigest || row.Created == "" {
		t.Fatalf("referrers json: exit %d, %q", code, stdout)
	}

	code, stdout, _ = execute(t, "inspect", image)
	if code != 0 || !strings.Contains(stdout, artifactDigest) || !strings.Contains(stdout, "CHUNKS") {
		t.Fatalf("inspect: exit %d, %q", code, stdout)
	}
	code, stdout, _ = execute(t, "inspect", "-o", "json", image)
	var sum imageSummary
	if code != 0 || json.Unmarshal([]byte(strings.TrimSpace(stdout)), &sum) != nil || len(sum.Layers) != 2 || sum.Layers[0].Files != 1 || sum.Layers[0].Dirs != 1 || sum.Layers[0].Chunks < 3 {
		t.Fatalf("inspect json: exit %d, %q", code, stdout)
	}
	code, stdout, _ = execute(t, "inspect", "--layer", "1", "--files", image)
	for _, want := range []string{"drwxr-xr-x", "-rwsr-xr-x", "7/8", "etc/file1", "etc/link -> file0"} {
		if code != 0 || !strings.Contains(stdout, want) {
			t.Errorf("inspect --files: exit %d, output lacks %q:\n%s", code, want, stdout)
		}
	}

	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"inspect", reg.Host + "/cli/app:missing"}, exitNotFound},
		{[]string{"create", reg.Host + "/cli/nothing:v1"}, exitNotFound},
		{[]string{"inspect", "--layer", "5", "--files", image}, exitUsage},
		{[]string{"create", "127.0.0.1:1/cli/app:v1"}, exitUnreachable},
	} {
		if code, _, stderr := execute(t, tc.args...); code != tc.code {
			t.Errorf("%v: exit %d, want %d (%s)", tc.args, code, tc.code, stderr)
		}
	}
}

func TestInspectWithoutArtifact(t *testing.T) {
	reg := testenv.Registry(t, testenv.RegistryOptions{})
	c, err := fetcher.New(fetcher.Options{DockerConfig: filepath.Join(t.TempDir(), "config.json")})
	if err != nil {
		t.Fatal(err)
	}
	image := reg.Host + "/cli/plain:v1"
	ref, _ := fetcher.ParseRef(image)
	pushTestImage(t, c, ref)
	code, _, stderr := execute(t, "inspect", image)
	if code != exitNotFound || !strings.Contains(stderr, "no streaming artifact") {
		t.Fatalf("inspect of an unconverted image: exit %d, %q", code, stderr)
	}
}
