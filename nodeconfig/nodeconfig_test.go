package nodeconfig

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

const sock = "/run/streamer-snapshotter/streamer.sock"

// v2Full is a containerd 1.6/1.7 config with settings that must survive.
const v2Full = `# my node
version = 2
root = "/var/lib/containerd"
oom_score = -999

[grpc]
  max_recv_message_size = 16777216

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
    endpoint = ["https://mirror.example.com", "https://registry-1.docker.io"]

[timeouts]
  "io.containerd.timeout.shim.cleanup" = "5s"
`

const v3Full = `version = 3
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  disable_snapshot_annotations = true
  max_concurrent_downloads = 3
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  SystemdCgroup = true
`

func decode(t *testing.T, b []byte) map[string]any {
	t.Helper()
	m, err := Decode(b)
	if err != nil {
		t.Fatalf("decode:\n%s\n%v", b, err)
	}
	return m
}

func get(t *testing.T, doc map[string]any, path ...string) any {
	t.Helper()
	v, ok, err := lookup(doc, path)
	if err != nil || !ok {
		t.Fatalf("%s: absent (%v)", keyString(path), err)
	}
	return v
}

func TestApply(t *testing.T) {
	tests := []struct {
		name        string
		src         string
		wantVersion int64
		criTable    []string
		wantChanges int
		created     bool
	}{
		{"absent file", "", 2, []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"}, 4, true},
		{"comments only", "# nothing yet\n\n", 2, []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"}, 4, true},
		{"v2 with other settings", v2Full, 2, []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"}, 4, false},
		{"v3", v3Full, 3, []string{"plugins", "io.containerd.cri.v1.images"}, 4, false},
		{"v2 half configured", "version = 2\n[proxy_plugins.streamer]\ntype = \"snapshot\"\naddress = \"/old.sock\"\ncapabilities = [\"x\"]\n", 2, []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"}, 3, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, rec, err := Apply([]byte(tt.src), Options{Address: sock})
			if err != nil {
				t.Fatal(err)
			}
			if rec.Version != tt.wantVersion || rec.CreatedFile != tt.created || len(rec.Changes) != tt.wantChanges {
				t.Errorf("record %+v: want version %d, created %v, %d changes", rec, tt.wantVersion, tt.created, len(rec.Changes))
			}
			doc := decode(t, out)
			if v, _ := Version(doc); v != tt.wantVersion {
				t.Errorf("version %d, want %d", v, tt.wantVersion)
			}
			if got := get(t, doc, "proxy_plugins", "streamer", "type"); got != "snapshot" {
				t.Errorf("plugin type %v", got)
			}
			if got := get(t, doc, "proxy_plugins", "streamer", "address"); got != sock {
				t.Errorf("plugin address %v", got)
			}
			if got := get(t, doc, append(tt.criTable, "snapshotter")...); got != "streamer" {
				t.Errorf("snapshotter %v", got)
			}
			if got := get(t, doc, append(tt.criTable, "disable_snapshot_annotations")...); got != false {
				t.Errorf("disable_snapshot_annotations %v", got)
			}
			st, err := Inspect(out, "")
			if err != nil || st.PluginType != "snapshot" || st.PluginAddress != sock || st.Snapshotter != "streamer" || !st.AnnotationsEnabled {
				t.Errorf("Inspect = %+v, %v", st, err)
			}

			// Idempotent: a second Apply returns the same bytes, no changes.
			again, rec2, err := Apply(out, Options{Address: sock})
			if err != nil || string(again) != string(out) || len(rec2.Changes) != 0 || rec2.CreatedFile {
				t.Errorf("second Apply changed something: %+v, %v", rec2, err)
			}

			// The record survives JSON (the state file) and Revert restores
			// the original document exactly.
			j, err := json.Marshal(rec)
			if err != nil {
				t.Fatal(err)
			}
			var back Record
			if err := json.Unmarshal(j, &back); err != nil {
				t.Fatal(err)
			}
			reverted, warnings, err := Revert(out, back)
			if err != nil || len(warnings) > 0 {
				t.Fatalf("Revert: %v %v", warnings, err)
			}
			if tt.created {
				if reverted != nil {
					t.Errorf("Revert of a created file = %q, want nil (remove the file)", reverted)
				}
				return
			}
			if want, got := decode(t, []byte(tt.src)), decode(t, reverted); !reflect.DeepEqual(want, got) {
				t.Errorf("Revert did not restore the original:\nwant %v\ngot  %v", want, got)
			}
		})
	}
}

func TestApplyKeepsOtherSettings(t *testing.T) {
	out, _, err := Apply([]byte(v2Full), Options{Address: sock})
	if err != nil {
		t.Fatal(err)
	}
	doc := decode(t, out)
	for _, c := range []struct {
		path []string
		want any
	}{
		{[]string{"root"}, "/var/lib/containerd"},
		{[]string{"oom_score"}, int64(-999)},
		{[]string{"grpc", "max_recv_message_size"}, int64(16777216)},
		{[]string{"plugins", "io.containerd.grpc.v1.cri", "restrict_oom_score_adj"}, true},
		{[]string{"plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes", "runc", "options", "SystemdCgroup"}, true},
		{[]string{"plugins", "io.containerd.grpc.v1.cri", "registry", "mirrors", "docker.io", "endpoint"}, []any{"https://mirror.example.com", "https://registry-1.docker.io"}},
		{[]string{"timeouts", "io.containerd.timeout.shim.cleanup"}, "5s"},
	} {
		if got := get(t, doc, c.path...); !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s = %#v, want %#v", keyString(c.path), got, c.want)
		}
	}
	// Everything but the snapshotter keys is the original.
	orig := decode(t, []byte(v2Full))
	strip := func(m map[string]any) {
		del(m, []string{"proxy_plugins"})
		del(m, []string{"plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"})
		del(m, []string{"plugins", "io.containerd.grpc.v1.cri", "containerd", "disable_snapshot_annotations"})
	}
	strip(doc)
	strip(orig)
	if !reflect.DeepEqual(doc, orig) {
		t.Errorf("other settings changed:\nwant %v\ngot  %v", orig, doc)
	}
}

func TestApplyErrors(t *testing.T) {
	tests := []struct {
		name, src string
		opts      Options
		want      string
		is        error
	}{
		{"version 1", "root = \"/var/lib/containerd\"\n", Options{Address: sock}, "version 1", ErrUnsupportedVersion},
		{"version 9", "version = 9\n", Options{Address: sock}, "version 9", ErrUnsupportedVersion},
		{"not TOML", "version = = 2\n", Options{Address: sock}, "parse containerd config", nil},
		{"no address", "version = 2\n", Options{}, "address", nil},
		{"plugin not a table", "version = 2\nproxy_plugins = 3\n", Options{Address: sock}, "proxy_plugins is a int64", nil},
		{"snapshotter not a string", "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = 1\n", Options{Address: sock}, "want a string", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Apply([]byte(tt.src), tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one saying %q", err, tt.want)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("err = %v, want errors.Is %v", err, tt.is)
			}
		})
	}
}

func TestRevertLeavesLaterEdits(t *testing.T) {
	out, rec, err := Apply([]byte(v2Full), Options{Address: sock})
	if err != nil {
		t.Fatal(err)
	}
	// An operator points CRI elsewhere and adds a setting after install.
	doc := decode(t, out)
	set(doc, []string{"plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"}, "native")
	set(doc, []string{"proxy_plugins", "other", "type"}, "snapshot")
	edited, err := Encode(doc)
	if err != nil {
		t.Fatal(err)
	}
	reverted, warnings, err := Revert(edited, rec)
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "snapshotter") {
		t.Errorf("warnings %q, want one about the snapshotter", warnings)
	}
	got := decode(t, reverted)
	if v := get(t, got, "plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"); v != "native" {
		t.Errorf("operator's snapshotter %v, want native kept", v)
	}
	if _, ok, _ := lookup(got, []string{"proxy_plugins", "streamer"}); ok {
		t.Errorf("proxy_plugins.streamer left behind")
	}
	if v := get(t, got, "proxy_plugins", "other", "type"); v != "snapshot" {
		t.Errorf("operator's plugin lost: %v", v)
	}
}

func TestMerge(t *testing.T) {
	first := Record{Version: 2, Changes: []Change{{Key: []string{"a"}, Existed: true, Old: "x", New: "y"}}}
	later := Record{Version: 2, Changes: []Change{
		{Key: []string{"a"}, Existed: true, Old: "z", New: "w"},
		{Key: []string{"b"}, New: false},
	}}
	m := first.Merge(later)
	want := []Change{{Key: []string{"a"}, Existed: true, Old: "x", New: "w"}, {Key: []string{"b"}, New: false}}
	if !reflect.DeepEqual(m.Changes, want) {
		t.Errorf("Merge = %+v, want %+v", m.Changes, want)
	}
	if len(first.Changes) != 1 || first.Changes[0].New != "y" {
		t.Errorf("Merge modified its receiver: %+v", first)
	}
}

func TestInspect(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want Status
	}{
		{"unconfigured v2", "version = 2\n", Status{Version: 2}},
		{"annotations default", "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"streamer\"\n", Status{Version: 2, Snapshotter: "streamer"}},
		{"v3 configured", "version = 3\n[proxy_plugins.streamer]\ntype = \"snapshot\"\naddress = \"/s.sock\"\n[plugins.\"io.containerd.cri.v1.images\"]\nsnapshotter = \"streamer\"\ndisable_snapshot_annotations = false\n",
			Status{Version: 3, PluginType: "snapshot", PluginAddress: "/s.sock", Snapshotter: "streamer", AnnotationsEnabled: true}},
		// A v2 key in a v3 file is not what containerd 2 reads.
		{"v3 with v2 keys", "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"streamer\"\n", Status{Version: 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Inspect([]byte(tt.src), "")
			if err != nil || got != tt.want {
				t.Errorf("Inspect = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}
