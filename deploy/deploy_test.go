package deploy

import (
	"errors"
	"io/fs"
	"path"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/streamer-dev/streamer/config"
)

// strict decodes one YAML document into v as the API server does with
// fieldValidation=Strict: unknown, duplicate or wrongly cased keys are
// errors, not silently dropped. (encoding/json's DisallowUnknownFields alone
// would accept "nodeselector" for nodeSelector: it matches names
// case-insensitively.)
func strict(t *testing.T, name string, v any) {
	t.Helper()
	b, err := fs.ReadFile(Manifests, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := decodeStrict(b, v); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func decodeStrict(b []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(b)
	if err != nil {
		return err
	}
	strictErrs, err := kjson.UnmarshalStrict(j, v)
	if err != nil {
		return err
	}
	return errors.Join(strictErrs...)
}

type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace"`
	Resources  []string `json:"resources"`
	Images     []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
	} `json:"images"`
}

func TestKustomization(t *testing.T) {
	var k kustomization
	strict(t, "kustomization.yaml", &k)
	if k.Kind != "Kustomization" || k.APIVersion != "kustomize.config.k8s.io/v1beta1" {
		t.Errorf("kustomization is %s %s", k.APIVersion, k.Kind)
	}
	files, err := fs.Glob(Manifests, "*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f != "kustomization.yaml" && !slices.Contains(k.Resources, f) {
			t.Errorf("%s is not among the kustomization's resources", f)
		}
	}
	for _, r := range k.Resources {
		if _, err := fs.Stat(Manifests, r); err != nil {
			t.Errorf("resource %s: %v", r, err)
		}
	}
	var ds appsv1.DaemonSet
	strict(t, "daemonset.yaml", &ds)
	for _, img := range k.Images {
		if !strings.HasPrefix(ds.Spec.Template.Spec.Containers[0].Image, img.Name+":") {
			t.Errorf("kustomization image %s matches no image of the DaemonSet", img.Name)
		}
	}
}

func TestNamespaceAndServiceAccount(t *testing.T) {
	var k kustomization
	strict(t, "kustomization.yaml", &k)
	var ns corev1.Namespace
	strict(t, "namespace.yaml", &ns)
	var sa corev1.ServiceAccount
	strict(t, "serviceaccount.yaml", &sa)
	var ds appsv1.DaemonSet
	strict(t, "daemonset.yaml", &ds)
	if ns.Kind != "Namespace" || ns.APIVersion != "v1" || sa.Kind != "ServiceAccount" || sa.APIVersion != "v1" {
		t.Errorf("kinds: %s %s, %s %s", ns.APIVersion, ns.Kind, sa.APIVersion, sa.Kind)
	}
	for what, got := range map[string]string{"kustomization": k.Namespace, "service account": sa.Namespace, "DaemonSet": ds.Namespace} {
		if got != ns.Name {
			t.Errorf("%s namespace %q, want %q", what, got, ns.Name)
		}
	}
	if ns.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Errorf("namespace does not allow privileged pods under Pod Security admission")
	}
	if ds.Spec.Template.Spec.ServiceAccountName != sa.Name {
		t.Errorf("DaemonSet runs as %q, the service account is %q", ds.Spec.Template.Spec.ServiceAccountName, sa.Name)
	}
	if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
		t.Errorf("service account mounts a token; the daemon calls no Kubernetes API")
	}
}

func TestDaemonSet(t *testing.T) {
	var ds appsv1.DaemonSet
	strict(t, "daemonset.yaml", &ds)
	if ds.Kind != "DaemonSet" || ds.APIVersion != "apps/v1" {
		t.Fatalf("daemonset.yaml is %s %s", ds.APIVersion, ds.Kind)
	}
	spec := ds.Spec.Template.Spec
	def := config.DefaultDaemon()
	socketDir := path.Dir(def.Address)

	// Scheduling.
	if got := spec.NodeSelector["streamer.dev/enabled"]; got != "true" {
		t.Errorf("nodeSelector streamer.dev/enabled = %q, want \"true\"", got)
	}
	if ds.Spec.Selector == nil {
		t.Fatal("no selector")
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the template's labels", k, v)
		}
	}

	// Volumes: host paths only.
	hostPaths := map[string]string{} // volume -> host path
	for _, v := range spec.Volumes {
		if v.HostPath == nil {
			t.Errorf("volume %s is not a hostPath", v.Name)
			continue
		}
		hostPaths[v.Name] = v.HostPath.Path
	}
	for _, p := range []string{"/usr/local/bin", "/etc/systemd/system", "/etc/containerd", "/etc/streamer-snapshotter", "/run/systemd", socketDir} {
		if !slices.Contains(mapValues(hostPaths), p) {
			t.Errorf("no hostPath volume for %s", p)
		}
	}
	// The daemon runs on the host, not in the pod: the pod holds neither
	// FUSE nor the snapshotter's root.
	for _, p := range []string{"/dev/fuse", def.Root} {
		if slices.Contains(mapValues(hostPaths), p) {
			t.Errorf("hostPath volume for %s: the daemon must not run in the pod (a pod that needs the snapshotter cannot be recreated without it)", p)
		}
	}

	if len(spec.InitContainers) != 1 || len(spec.Containers) != 1 {
		t.Fatalf("%d init containers and %d containers, want 1 and 1", len(spec.InitContainers), len(spec.Containers))
	}
	initC, main := spec.InitContainers[0], spec.Containers[0]
	if initC.Image != main.Image {
		t.Errorf("init image %s, main image %s: want one image", initC.Image, main.Image)
	}
	mounted := func(c corev1.Container, p string) *corev1.VolumeMount {
		for i, m := range c.VolumeMounts {
			if m.MountPath == p {
				return &c.VolumeMounts[i]
			}
		}
		return nil
	}

	// The installer: copies the binary to the host, writes the unit and
	// edits containerd's config, then has the host's systemd start the
	// daemon and restart containerd.
	if len(initC.Command) < 2 || initC.Command[1] != "install" {
		t.Fatalf("init container runs %q, want streamer-snapshotter install", initC.Command)
	}
	if !slices.Contains(initC.Command, "--restart-containerd") {
		t.Errorf("init container command %q lacks --restart-containerd", initC.Command)
	}
	if initC.SecurityContext == nil || initC.SecurityContext.Privileged == nil || !*initC.SecurityContext.Privileged {
		t.Errorf("init container is not privileged (it writes host files and talks to the host's systemd)")
	}
	unitDir, binary, copyTo := flagValue(initC.Command, "--unit-dir"), flagValue(initC.Command, "--binary"), flagValue(initC.Command, "--copy-binary")
	if unitDir == "" || binary == "" || copyTo == "" {
		t.Fatalf("init container command %q: want --unit-dir, --binary and --copy-binary set (a systemd unit on the host runs the copied binary)", initC.Command)
	}
	// The copy lands where the unit looks: --copy-binary is --binary seen
	// through the host-bin mount.
	copied := false
	for _, m := range initC.VolumeMounts {
		rel, ok := strings.CutPrefix(copyTo, m.MountPath+"/")
		if ok && path.Join(hostPaths[m.Name], rel) == binary {
			copied = true
		}
	}
	if !copied {
		t.Errorf("--copy-binary=%s is not --binary=%s on the host through any mount of the init container", copyTo, binary)
	}
	for _, c := range []corev1.Container{initC, main} {
		if c.Image == "" || !strings.Contains(c.Image, ":") {
			t.Errorf("container %s: image %q, want a tagged image", c.Name, c.Image)
		}
		for _, m := range c.VolumeMounts {
			hp, ok := hostPaths[m.Name]
			switch {
			case !ok:
				t.Errorf("container %s mounts unknown volume %s", c.Name, m.Name)
			case c.Name == initC.Name && strings.HasPrefix(copyTo, m.MountPath+"/"):
				// The binary's directory: mounted aside, so the image's
				// own binary is not hidden.
			case hp != m.MountPath:
				t.Errorf("container %s mounts host %s at %s: paths must be equal, they are written into host files", c.Name, hp, m.MountPath)
			}
		}
	}
	for _, p := range []string{unitDir, "/etc/containerd", "/etc/streamer-snapshotter", "/run/systemd", socketDir} {
		if mounted(initC, p) == nil {
			t.Errorf("init container does not mount %s", p)
		}
	}

	// The main container only checks the host's daemon: unprivileged,
	// read-only, its command a long-running check.
	if len(main.Command) < 2 || main.Command[1] != "check" || !slices.Contains(main.Command, "--quick") || flagValue(main.Command, "--watch") == "" {
		t.Errorf("main container runs %q, want streamer-snapshotter check --quick --watch=INTERVAL", main.Command)
	}
	if sc := main.SecurityContext; sc == nil || (sc.Privileged != nil && *sc.Privileged) ||
		sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, corev1.Capability("ALL")) {
		t.Errorf("main container security context %+v: want unprivileged, no escalation, read-only root, all capabilities dropped", sc)
	}
	for _, p := range []string{socketDir, "/etc/streamer-snapshotter"} {
		if m := mounted(main, p); m == nil || !m.ReadOnly {
			t.Errorf("main container does not mount %s read-only", p)
		}
	}
	for _, p := range []string{"/etc/containerd", unitDir, "/run/systemd"} {
		if mounted(main, p) != nil {
			t.Errorf("main container mounts %s; only the installer needs it", p)
		}
	}
	for name, p := range map[string]*corev1.Probe{"liveness": main.LivenessProbe, "readiness": main.ReadinessProbe} {
		if p == nil || p.Exec == nil || !slices.Contains(p.Exec.Command, "check") || !slices.Contains(p.Exec.Command, "--quick") {
			t.Errorf("%s probe %+v, want exec streamer-snapshotter check --quick", name, p)
		}
	}
}

// flagValue is the value of a --name=value argument, "" if absent.
func flagValue(cmd []string, name string) string {
	for _, a := range cmd {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

func mapValues(m map[string]string) []string {
	var out []string
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

func TestStrictCatchesBadFields(t *testing.T) {
	tests := []struct{ name, yaml, want string }{
		{"wrong case", "apiVersion: apps/v1\nkind: DaemonSet\nspec:\n  template:\n    spec:\n      nodeselector: {a: b}\n", "nodeselector"},
		{"misplaced", "apiVersion: apps/v1\nkind: DaemonSet\nspec:\n  nodeSelector: {a: b}\n", "nodeSelector"},
		{"duplicate", "apiVersion: apps/v1\nkind: DaemonSet\nkind: DaemonSet\n", "kind"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ds appsv1.DaemonSet
			if err := decodeStrict([]byte(tt.yaml), &ds); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("decode: %v, want an error naming %s", err, tt.want)
			}
		})
	}
}
