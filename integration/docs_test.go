package integration

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/streamer-dev/streamer/integration/harness"
)

func repoFile(t *testing.T, rel string) []byte {
	t.Helper()
	root, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(root, rel))
	if err != nil {
		t.Fatalf("read %s: %v", rel, err)
	}
	return data
}

// TestReadmeQuickStart: the quick start is exactly `make demo` and
// `make test`, in its first code block.
func TestReadmeQuickStart(t *testing.T) {
	readme := string(repoFile(t, "README.md"))
	_, after, ok := strings.Cut(readme, "## Quick start")
	if !ok {
		t.Fatalf("README.md has no '## Quick start' section")
	}
	if i := strings.Index(after, "\n## "); i >= 0 {
		after = after[:i]
	}
	block := regexp.MustCompile("(?s)```[a-z]*\n(.*?)```").FindStringSubmatch(after)
	if block == nil {
		t.Fatalf("the quick start has no code block")
	}
	var cmds []string
	for _, line := range strings.Split(block[1], "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			cmds = append(cmds, line)
		}
	}
	if strings.Join(cmds, "|") != "make demo|make test" {
		t.Fatalf("quick start commands: %q, want exactly [make demo, make test]", cmds)
	}
}

// TestContainerdConfigDoc: docs/containerd-config.toml parses and configures
// the proxy plugin and the CRI settings the node needs; the harness keeps
// them when it derives the test daemon's config.
func TestContainerdConfigDoc(t *testing.T) {
	data := repoFile(t, "docs/containerd-config.toml")
	check := func(t *testing.T, name string, doc []byte) {
		t.Helper()
		cfg := map[string]any{}
		if err := toml.Unmarshal(doc, &cfg); err != nil {
			t.Fatalf("%s does not parse: %v", name, err)
		}
		for _, c := range []struct {
			path []string
			want any
		}{
			{[]string{"version"}, int64(2)},
			{[]string{"proxy_plugins", "streamer", "type"}, "snapshot"},
			{[]string{"plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"}, "streamer"},
			{[]string{"plugins", "io.containerd.grpc.v1.cri", "containerd", "disable_snapshot_annotations"}, false},
		} {
			got, ok := harness.GetPath(cfg, c.path...)
			if !ok || got != c.want {
				t.Errorf("%s: %s = %#v, want %#v", name, strings.Join(c.path, "."), got, c.want)
			}
		}
		if addr, _ := harness.GetPath(cfg, "proxy_plugins", "streamer", "address"); addr == nil || addr == "" {
			t.Errorf("%s: proxy_plugins.streamer.address is not set", name)
		}
	}
	check(t, "docs/containerd-config.toml", data)
	if !strings.Contains(string(data), "restrict_oom_score_adj") {
		t.Errorf("docs/containerd-config.toml does not mention restrict_oom_score_adj (needed where root lacks CAP_SYS_RESOURCE)")
	}

	root, _ := harness.ModuleRoot()
	dir := t.TempDir()
	c := &harness.Containerd{Address: filepath.Join(dir, "c.sock"), Root: filepath.Join(dir, "root"), State: filepath.Join(dir, "state")}
	derived, err := harness.ContainerdConfig(harness.ContainerdOptions{
		Dir: dir, SnapshotterAddress: "/tmp/x/s.sock", SandboxImage: "127.0.0.1:5000/pause:v1",
		Mirrors:    map[string]string{"127.0.0.1:5000": "http://127.0.0.1:5000"},
		BaseConfig: filepath.Join(root, "docs", "containerd-config.toml"),
	}, c)
	if err != nil {
		t.Fatal(err)
	}
	check(t, "the derived test config", derived)
	cfg := map[string]any{}
	_ = toml.Unmarshal(derived, &cfg)
	if got, _ := harness.GetPath(cfg, "proxy_plugins", "streamer", "address"); got != "/tmp/x/s.sock" {
		t.Errorf("derived proxy address %v", got)
	}
	if got, _ := harness.GetPath(cfg, "plugins", "io.containerd.grpc.v1.cri", "restrict_oom_score_adj"); got != true {
		t.Errorf("derived restrict_oom_score_adj %v", got)
	}
}
