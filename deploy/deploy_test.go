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

	// Volumes: host paths the daemon and containerd must share, each at
	// the same path inside the container as on the host.
	hostPaths := map[string]string{} // volume -> host path
	for _, v := range spec.Volumes {
		if v.HostPath == nil {
			t.Errorf("volume %s is not a hostPath", v.Name)
			continue
		}
		hostPaths[v.Name] = v.HostPath.Path
	}
	for _, p := range []string{"/dev/fuse", "/etc/containerd", "/etc/streamer-snapshotter", "/run/systemd", path.Dir(def.Address), def.Root} {
		if !slices.Contains(mapValues(hostPaths), p) {
			t.Errorf("no hostPath volume for %s", p)
		}
	}

	if len(spec.InitContainers) != 1 || len(spec.Containers) != 1 {
		t.Fatalf("%d init containers and %d containers, want 1 and 1", len(spec.InitContainers), len(spec.Containers))
	}
	initC, daemon := spec.InitContainers[0], spec.Containers[0]
	for _, c := range []corev1.Container{initC, daemon} {
		if c.Image == "" || !strings.Contains(c.Image, ":") {
			t.Errorf("container %s: image %q, want a tagged image", c.Name, c.Image)
		}
		if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
			t.Errorf("container %s is not privileged", c.Name)
		}
		for _, m := range c.VolumeMounts {
			hp, ok := hostPaths[m.Name]
			if !ok {
				t.Errorf("container %s mounts unknown volume %s", c.Name, m.Name)
			} else if hp != m.MountPath {
				t.Errorf("container %s mounts host %s at %s: paths must be equal, containerd reads them on the host", c.Name, hp, m.MountPath)
			}
		}
	}
	if initC.Image != daemon.Image {
		t.Errorf("init image %s, daemon image %s: want one image", initC.Image, daemon.Image)
	}

	// The installer: install against the host's files, no unit (the daemon
	// is this pod), containerd restarted.
	if len(initC.Command) < 2 || initC.Command[1] != "install" {
		t.Errorf("init container runs %q, want streamer-snapshotter install", initC.Command)
	}
	for _, want := range []string{"--restart-containerd", "--unit-dir="} {
		if !slices.Contains(initC.Command, want) {
			t.Errorf("init container command %q lacks %s", initC.Command, want)
		}
	}
	mounted := func(c corev1.Container, p string) *corev1.VolumeMount {
		for i, m := range c.VolumeMounts {
			if m.MountPath == p {
				return &c.VolumeMounts[i]
			}
		}
		return nil
	}
	for _, p := range []string{"/etc/containerd", "/etc/streamer-snapshotter", "/run/systemd"} {
		if mounted(initC, p) == nil {
			t.Errorf("init container does not mount %s", p)
		}
	}

	// The daemon: FUSE, its socket where containerd dials it, and its root
	// with bidirectional propagation so the FUSE mounts it makes are seen by
	// containerd on the host.
	for _, p := range []string{"/dev/fuse", path.Dir(def.Address), "/etc/streamer-snapshotter"} {
		if mounted(daemon, p) == nil {
			t.Errorf("daemon does not mount %s", p)
		}
	}
	if m := mounted(daemon, def.Root); m == nil {
		t.Errorf("daemon does not mount its root %s", def.Root)
	} else if m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		got := "unset"
		if m.MountPropagation != nil {
			got = string(*m.MountPropagation)
		}
		t.Errorf("root %s mounted with propagation %s, want Bidirectional", def.Root, got)
	}
	if m := mounted(daemon, "/etc/containerd"); m != nil {
		t.Errorf("daemon mounts containerd's config; only the installer needs it")
	}
	if daemon.LivenessProbe == nil || daemon.LivenessProbe.Exec == nil ||
		!slices.Contains(daemon.LivenessProbe.Exec.Command, "check") || !slices.Contains(daemon.LivenessProbe.Exec.Command, "--quick") {
		t.Errorf("daemon liveness probe %+v, want exec streamer-snapshotter check --quick", daemon.LivenessProbe)
	}
	if spec.TerminationGracePeriodSeconds == nil || *spec.TerminationGracePeriodSeconds < 15 {
		t.Errorf("terminationGracePeriodSeconds %v: the daemon needs time to unmount its layers", spec.TerminationGracePeriodSeconds)
	}
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
