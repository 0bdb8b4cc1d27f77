package integration

import (
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

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

// TestCompatibilityDoc: docs/compatibility.md lists exactly the containerd
// versions the tests run: the system containerd's (`containerd --version`)
// and the containerd module's in go.mod (what integration/cmd/containerd17
// is built from), each matching a containerdMatrix entry.
func TestCompatibilityDoc(t *testing.T) {
	doc := string(repoFile(t, "docs/compatibility.md"))
	_, table, ok := strings.Cut(doc, "<!-- containerd versions: TestCompatibilityDoc reads this table -->")
	if !ok {
		t.Fatalf("docs/compatibility.md lacks the containerd versions table marker")
	}
	listed := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(table), "\n") {
		if !strings.HasPrefix(line, "|") {
			break // end of the table
		}
		cell := strings.TrimSpace(strings.Split(line, "|")[1])
		if regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(cell) {
			listed[cell] = true
		}
	}

	ctx := testContext(t, 30*time.Second)
	system, err := harness.ContainerdVersion(ctx, os.Getenv(harness.EnvContainerd))
	if err != nil {
		t.Skipf("SKIP: no system containerd to compare with the doc: %v", err)
	}
	m := regexp.MustCompile(`(?m)^\s*github\.com/containerd/containerd v(\d+\.\d+\.\d+)\b`).FindStringSubmatch(string(repoFile(t, "go.mod")))
	if m == nil {
		t.Fatalf("go.mod does not require github.com/containerd/containerd")
	}
	release := regexp.MustCompile(`^\d+\.\d+\.\d+`)
	want := map[string]bool{release.FindString(system): true, m[1]: true}
	if !reflect.DeepEqual(listed, want) {
		t.Errorf("docs/compatibility.md lists containerd %v; the tests run %v (system %q, go.mod %s)", slices.Sorted(maps.Keys(listed)), slices.Sorted(maps.Keys(want)), system, m[1])
	}
	for _, c := range containerdMatrix {
		found := false
		for v := range want {
			found = found || c.name == "containerd-"+harness.MajorMinor(v)
		}
		if !found {
			t.Errorf("matrix entry %s runs none of %v", c.name, slices.Sorted(maps.Keys(want)))
		}
	}
}
