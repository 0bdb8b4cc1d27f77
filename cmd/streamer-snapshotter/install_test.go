package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"

	"github.com/streamer-dev/streamer/config"
	"github.com/streamer-dev/streamer/deploy"
	"github.com/streamer-dev/streamer/nodeconfig"
)

// nodeContainerdConfig is a containerd 1.6 config with settings of its own,
// comments included, as nodes have.
const nodeContainerdConfig = `# Managed by the node image. Keep runc as default.
version = 2
oom_score = -999

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
    endpoint = ["https://mirror.example.com"]
`

// node is a fake node's file tree in a temp dir: install's paths.
type node struct {
	dir, containerdConfig, config, unitDir, sock string
}

func newNode(t *testing.T, containerdConfig string) node {
	t.Helper()
	dir := t.TempDir()
	n := node{
		dir:              dir,
		containerdConfig: filepath.Join(dir, "etc", "containerd", "config.toml"),
		config:           filepath.Join(dir, "etc", "streamer-snapshotter", "config.toml"),
		unitDir:          filepath.Join(dir, "etc", "systemd", "system"),
		sock:             filepath.Join(dir, "run", "streamer.sock"),
	}
	// A snapshotter config of the operator's: install keeps it and takes
	// the socket address from it.
	writeFile(t, n.config, "root = "+quote(filepath.Join(dir, "root"))+"\naddress = "+quote(n.sock)+"\n")
	if containerdConfig != "" {
		writeFile(t, n.containerdConfig, containerdConfig)
	}
	return n
}

func quote(s string) string { return `"` + s + `"` }

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (n node) args(extra ...string) []string {
	return append([]string{"--containerd-config", n.containerdConfig, "--config", n.config, "--unit-dir", n.unitDir, "--binary", "/usr/local/bin/streamer-snapshotter"}, extra...)
}

// runBinary runs the built binary and returns its exit code and output.
func runBinary(t *testing.T, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("%s: timed out\n%s", strings.Join(args, " "), out.String())
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), out.String()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, out.String()
}

// tree hashes every file under dir: a change anywhere shows.
func tree(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	m := map[string][32]byte{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		m[p] = sha256.Sum256(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func decodeTOML(t *testing.T, b []byte) map[string]any {
	t.Helper()
	m := map[string]any{}
	if err := toml.Unmarshal(b, &m); err != nil {
		t.Fatalf("%v\n%s", err, b)
	}
	return m
}

// containerdDump runs the real containerd on the config (no daemon: only
// `config dump`, which loads and merges it) and returns the effective config.
func containerdDump(t *testing.T, path string) string {
	t.Helper()
	if _, err := exec.LookPath("containerd"); err != nil {
		t.Skip("SKIPPED: containerd is not installed; the edited config is not checked against it")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "containerd", "--config", path, "config", "dump").CombinedOutput()
	if err != nil {
		t.Fatalf("containerd config dump of the edited config: %v\n%s", err, out)
	}
	return string(out)
}

func TestInstallThenUninstall(t *testing.T) {
	n := newNode(t, nodeContainerdConfig)
	code, out := runBinary(t, append([]string{"install"}, n.args()...)...)
	if code != 0 {
		t.Fatalf("install: exit %d\n%s", code, out)
	}
	for _, want := range []string{"kept " + n.config, "wrote " + filepath.Join(n.unitDir, unitName), "backed up", "comments and formatting", "next:"} {
		if !strings.Contains(out, want) {
			t.Errorf("install output lacks %q:\n%s", want, out)
		}
	}

	// containerd 1.6 itself reads the edited file and sees the plugin.
	dump := containerdDump(t, n.containerdConfig)
	for _, want := range []string{
		"[proxy_plugins.streamer]",
		`address = "` + n.sock + `"`,
		`type = "snapshot"`,
		`snapshotter = "streamer"`,
		"disable_snapshot_annotations = false",
		`sandbox_image = "registry.k8s.io/pause:3.9"`,
		"restrict_oom_score_adj = true",
		`endpoint = ["https://mirror.example.com"]`,
		"oom_score = -999",
	} {
		if !strings.Contains(dump, want) {
			t.Errorf("containerd config dump lacks %q", want)
		}
	}

	unit, err := os.ReadFile(filepath.Join(n.unitDir, unitName))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Before=containerd.service", "ExecStart=/usr/local/bin/streamer-snapshotter --config " + n.config, "Restart=always", "KillMode=process", "WantedBy=multi-user.target"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %q:\n%s", want, unit)
		}
	}
	backups, _ := filepath.Glob(n.containerdConfig + backupSuffix + "*")
	if len(backups) != 1 {
		t.Fatalf("backups %q, want 1", backups)
	}
	if b, _ := os.ReadFile(backups[0]); string(b) != nodeContainerdConfig {
		t.Errorf("backup is not the original:\n%s", b)
	}

	// Idempotent: a second install changes nothing, not even the state or
	// a second backup; a dry run says so.
	before := tree(t, n.dir)
	code, out = runBinary(t, append([]string{"install"}, n.args()...)...)
	if code != 0 || !strings.Contains(out, "already configured") {
		t.Fatalf("second install: exit %d\n%s", code, out)
	}
	if after := tree(t, n.dir); !reflect.DeepEqual(before, after) {
		t.Errorf("second install changed files")
	}
	code, out = runBinary(t, append([]string{"install", "--dry-run"}, n.args()...)...)
	if code != 0 || !strings.Contains(out, "nothing would change") {
		t.Errorf("dry run of an installed node: exit %d\n%s", code, out)
	}

	// Uninstall puts the original back byte for byte, comments included,
	// removes the unit, keeps the operator's snapshotter config.
	code, out = runBinary(t, "uninstall", "--config", n.config)
	if code != 0 {
		t.Fatalf("uninstall: exit %d\n%s", code, out)
	}
	if b, _ := os.ReadFile(n.containerdConfig); string(b) != nodeContainerdConfig {
		t.Errorf("containerd config after uninstall:\n%s\nwant the original", b)
	}
	for _, gone := range []string{filepath.Join(n.unitDir, unitName), filepath.Join(filepath.Dir(n.config), stateFileName)} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("%s still there after uninstall (%v)", gone, err)
		}
	}
	if _, err := os.Stat(n.config); err != nil {
		t.Errorf("operator's snapshotter config removed: %v", err)
	}
	if code, out := runBinary(t, "uninstall", "--config", n.config); code == 0 || !strings.Contains(out, "no install state") {
		t.Errorf("second uninstall: exit %d, want a failure saying there is nothing to undo\n%s", code, out)
	}
}

func TestInstallFreshNode(t *testing.T) {
	n := newNode(t, "")
	os.Remove(n.config) // no snapshotter config either: defaults are written
	code, out := runBinary(t, append([]string{"install"}, n.args()...)...)
	if code != 0 {
		t.Fatalf("install: exit %d\n%s", code, out)
	}
	cfg, err := config.LoadDaemon(n.config)
	if err != nil || cfg.Validate() != nil {
		t.Fatalf("written snapshotter config: %v", err)
	}
	// Compared encoded: decoding turns absent lists into empty ones.
	var got, want bytes.Buffer
	cfg.Encode(&got)
	config.DefaultDaemon().Encode(&want)
	if got.String() != want.String() {
		t.Errorf("written snapshotter config is not the default:\n%s", got.String())
	}
	b, err := os.ReadFile(n.containerdConfig)
	if err != nil {
		t.Fatal(err)
	}
	if v := decodeTOML(t, b)["version"]; v != int64(2) {
		t.Errorf("new containerd config version %v, want 2", v)
	}
	dump := containerdDump(t, n.containerdConfig)
	if !strings.Contains(dump, `address = "`+config.DefaultDaemon().Address+`"`) || !strings.Contains(dump, `snapshotter = "streamer"`) {
		t.Errorf("containerd does not see the plugin:\n%s", dump)
	}
	if backups, _ := filepath.Glob(n.containerdConfig + backupSuffix + "*"); len(backups) != 0 {
		t.Errorf("backup %q of a file that did not exist", backups)
	}

	code, out = runBinary(t, "uninstall", "--config", n.config)
	if code != 0 {
		t.Fatalf("uninstall: exit %d\n%s", code, out)
	}
	for _, gone := range []string{n.containerdConfig, n.config, filepath.Join(n.unitDir, unitName)} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("%s still there after uninstall (%v)", gone, err)
		}
	}
}

func TestInstallDryRun(t *testing.T) {
	n := newNode(t, nodeContainerdConfig)
	before := tree(t, n.dir)
	code, out := runBinary(t, append([]string{"install", "--dry-run"}, n.args()...)...)
	if code != 0 {
		t.Fatalf("dry run: exit %d\n%s", code, out)
	}
	if after := tree(t, n.dir); !reflect.DeepEqual(before, after) {
		t.Errorf("dry run changed files")
	}
	for _, want := range []string{
		"--- " + n.containerdConfig, "+++ " + n.containerdConfig, "@@ ",
		"+      snapshotter = 'streamer'", "-    snapshotter = \"overlayfs\"",
		"+Before=containerd.service", "comments and formatting",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run output lacks %q:\n%s", want, out)
		}
	}
}

func TestUninstallAfterOperatorEdit(t *testing.T) {
	n := newNode(t, nodeContainerdConfig)
	if code, out := runBinary(t, append([]string{"install"}, n.args()...)...); code != 0 {
		t.Fatalf("install: exit %d\n%s", code, out)
	}
	// The operator adds a setting after install: the backup is stale, so
	// uninstall reverts key by key and keeps the new setting.
	f, err := os.OpenFile(n.containerdConfig, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(f, "\n[debug]\n  level = \"debug\"\n")
	f.Close()
	code, out := runBinary(t, "uninstall", "--config", n.config)
	if code != 0 || !strings.Contains(out, "key by key") {
		t.Fatalf("uninstall: exit %d\n%s", code, out)
	}
	b, _ := os.ReadFile(n.containerdConfig)
	want := decodeTOML(t, []byte(nodeContainerdConfig+"\n[debug]\n  level = \"debug\"\n"))
	if got := decodeTOML(t, b); !reflect.DeepEqual(got, want) {
		t.Errorf("after uninstall:\n%v\nwant the original plus the operator's edit:\n%v", got, want)
	}
}

func TestInstallRestartWithoutSystemd(t *testing.T) {
	if systemdRunning() {
		t.Skip("SKIPPED: systemd runs here; --restart-containerd would restart the machine's containerd")
	}
	n := newNode(t, nodeContainerdConfig)
	code, out := runBinary(t, append([]string{"install", "--restart-containerd"}, n.args()...)...)
	if code != 0 || !strings.Contains(out, "NOT restarted: systemd is not running") {
		t.Errorf("install --restart-containerd without systemd: exit %d\n%s", code, out)
	}
}

func TestInstallErrors(t *testing.T) {
	tests := []struct {
		name       string
		containerd string
		config     string
		args       []string
		want       string
	}{
		{"version 1 containerd config", "root = \"/var/lib/containerd\"\n", "", nil, "version 1"},
		{"broken containerd config", "version = = 2\n", "", nil, "parse containerd config"},
		{"invalid snapshotter config", nodeContainerdConfig, "[fetch]\nconcurrency = 0\n", nil, "fetch.concurrency"},
		{"unknown flag", nodeContainerdConfig, "", []string{"--colour"}, "flag provided but not defined"},
		{"stray argument", nodeContainerdConfig, "", []string{"now"}, "unexpected arguments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newNode(t, tt.containerd)
			if tt.config != "" {
				writeFile(t, n.config, tt.config)
			}
			before := tree(t, n.dir)
			code, out := runBinary(t, append(append([]string{"install"}, n.args()...), tt.args...)...)
			if code == 0 || !strings.Contains(out, tt.want) {
				t.Errorf("exit %d, want a failure saying %q:\n%s", code, tt.want, out)
			}
			if after := tree(t, n.dir); !reflect.DeepEqual(before, after) {
				t.Errorf("a failed install changed files")
			}
		})
	}
}

// TestDeployCommands keeps the DaemonSet's commands in step with the flags.
func TestDeployCommands(t *testing.T) {
	b, err := fs.ReadFile(deploy.Manifests, "daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(b, &ds); err != nil {
		t.Fatal(err)
	}
	spec := ds.Spec.Template.Spec
	initCmd := spec.InitContainers[0].Command
	f, err := parseInstallFlags("install", initCmd[2:], io.Discard)
	if err != nil {
		t.Fatalf("init container command %q: %v", initCmd, err)
	}
	if f.unitDir != defaultUnitDir || !f.restart || f.containerdConfig != defaultContainerdConfig || f.config != defaultConfigPath ||
		f.binary != "/usr/local/bin/streamer-snapshotter" || f.copyBinary == "" {
		t.Errorf("init container flags %+v: want the default unit dir, restart, default paths, the binary copied to the host's /usr/local/bin", f)
	}
	mainCmd := spec.Containers[0].Command
	if len(mainCmd) < 2 || mainCmd[1] != "check" {
		t.Fatalf("main container runs %q, want streamer-snapshotter check", mainCmd)
	}
	if cf, _, err := parseCheckFlags(mainCmd[2:], io.Discard); err != nil || !cf.quick || cf.watch <= 0 || cf.config != defaultConfigPath {
		t.Errorf("main container %q: %+v, %v; want check --quick --watch with the default config", mainCmd, cf, err)
	}
	for _, p := range []*struct{ cmd []string }{{spec.Containers[0].LivenessProbe.Exec.Command}, {spec.Containers[0].ReadinessProbe.Exec.Command}} {
		if p.cmd[1] != "check" {
			t.Errorf("probe %q does not run check", p.cmd)
			continue
		}
		cf, _, err := parseCheckFlags(p.cmd[2:], io.Discard)
		if err != nil || !cf.quick || cf.watch != 0 {
			t.Errorf("probe %q: %+v, %v; want check --quick (once)", p.cmd, cf, err)
		}
	}
}

// TestNodeconfigDefaultAddress keeps install and docs/containerd-config.toml in step.
func TestNodeconfigDefaultAddress(t *testing.T) {
	out, _, err := nodeconfig.Apply(nil, nodeconfig.Options{Address: config.DefaultDaemon().Address})
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "containerd-config.toml"))
	if err != nil {
		t.Fatal(err)
	}
	// The documented snippet and what install writes configure the same.
	got, want := decodeTOML(t, out), decodeTOML(t, doc)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("install writes\n%v\ndocs/containerd-config.toml says\n%v", got, want)
	}
}

// TestInstallCopyBinary is the DaemonSet's install: the binary is copied
// to the host (through a mount, so the path install writes differs from the
// path the unit runs), idempotently; a different binary there is replaced
// (an upgrade); uninstall removes the copy, found by either path.
func TestInstallCopyBinary(t *testing.T) {
	n := newNode(t, nodeContainerdConfig)
	copyTo := filepath.Join(n.dir, "container", "host", "usr", "local", "bin", "streamer-snapshotter")
	hostPath := filepath.Join(n.dir, "host", "usr", "local", "bin", "streamer-snapshotter")
	args := []string{"install", "--containerd-config", n.containerdConfig, "--config", n.config, "--unit-dir", n.unitDir,
		"--copy-binary", copyTo, "--binary", hostPath}
	self, err := os.ReadFile(binary)
	if err != nil {
		t.Fatal(err)
	}

	code, out := runBinary(t, append(args, "--dry-run")...)
	if code != 0 || !strings.Contains(out, "would copy this executable to "+copyTo) {
		t.Fatalf("dry run: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(copyTo); !os.IsNotExist(err) {
		t.Fatalf("dry run copied the binary (%v)", err)
	}

	for _, tc := range []struct {
		name, before, want string
	}{
		{"first install", "", "copied this executable to " + copyTo},
		{"again", "", "unchanged " + copyTo},
		{"upgrade", "an older streamer-snapshotter", "copied this executable to " + copyTo},
	} {
		if tc.before != "" {
			writeFile(t, copyTo, tc.before)
		}
		before := tree(t, n.dir)
		code, out := runBinary(t, args...)
		if code != 0 || !strings.Contains(out, tc.want) {
			t.Fatalf("%s: exit %d, want %q\n%s", tc.name, code, tc.want, out)
		}
		got, err := os.ReadFile(copyTo)
		if err != nil || !bytes.Equal(got, self) {
			t.Fatalf("%s: %s is not this executable (%v)", tc.name, copyTo, err)
		}
		if fi, _ := os.Stat(copyTo); fi.Mode().Perm() != 0o755 {
			t.Errorf("%s: copy has mode %v, want 0755", tc.name, fi.Mode().Perm())
		}
		if tc.name == "again" && !reflect.DeepEqual(before, tree(t, n.dir)) {
			t.Errorf("a second install changed files")
		}
		if tc.name == "upgrade" && !strings.Contains(out, "next:") {
			t.Errorf("upgrade of the binary does not say the daemon must restart:\n%s", out)
		}
	}
	unit, err := os.ReadFile(filepath.Join(n.unitDir, unitName))
	if err != nil || !strings.Contains(string(unit), "ExecStart="+hostPath+" --config "+n.config) {
		t.Errorf("unit does not run --binary %s: %v\n%s", hostPath, err, unit)
	}

	// Uninstall runs on the host: the copy is found at the unit's path.
	writeFile(t, hostPath, string(self))
	os.Remove(copyTo)
	code, out = runBinary(t, "uninstall", "--config", n.config)
	if code != 0 || !strings.Contains(out, "removed "+hostPath+" (copied by install)") {
		t.Fatalf("uninstall: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(hostPath); !os.IsNotExist(err) {
		t.Errorf("%s still there after uninstall (%v)", hostPath, err)
	}
}
