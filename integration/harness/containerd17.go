package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// ContainerdRuntime is one containerd of the compatibility matrix: the
// daemon and the runc shim it runs containers with.
type ContainerdRuntime struct {
	// Name labels the runtime in test names, e.g. "containerd-1.6".
	Name string
	// Binary is the containerd executable; empty: StartContainerd's default
	// ($STREAMER_CONTAINERD, else containerd on PATH).
	Binary string
	// Shim is its containerd-shim-runc-v2; empty: the one on PATH.
	Shim string
}

// Options returns o set to run on this runtime.
func (r ContainerdRuntime) Options(o ContainerdOptions) ContainerdOptions {
	o.Binary, o.Shim = r.Binary, r.Shim
	return o
}

// SystemContainerd is the node's own containerd: Debian's 1.6 package, or
// whatever $STREAMER_CONTAINERD names.
var SystemContainerd = ContainerdRuntime{Name: "containerd-1.6"}

// Containerd17Tags leave out of containerd 1.7 the snapshotters that need
// cgo headers (btrfs, devmapper), modules the project does not carry (aufs,
// zfs) and tracing; the tests disable those plugins anyway.
const Containerd17Tags = "no_aufs no_btrfs no_devmapper no_zfs no_tracing"

// containerd17Pkgs are the mains built from the containerd Go module.
var containerd17Pkgs = []string{"./integration/cmd/containerd17", "./integration/cmd/containerd-shim-runc-v2"}

// BuildContainerd17 builds containerd 1.7 and its runc shim from the
// containerd module in go.mod (integration/cmd/containerd17 and
// integration/cmd/containerd-shim-runc-v2). The binaries are cached under
// the user cache directory (~/.cache/streamer), keyed by the Go version,
// go.mod, go.sum and the two mains: a cold build takes about a minute, a
// rebuild from Go's build cache still about ten seconds of linking.
func BuildContainerd17(ctx context.Context) (ContainerdRuntime, error) {
	root, err := ModuleRoot()
	if err != nil {
		return ContainerdRuntime{}, fmt.Errorf("build containerd 1.7: %w", err)
	}
	gobin := goBinary()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	goVersion, err := RunCommandIn(ctx, root, gobin, "version")
	if err != nil {
		return ContainerdRuntime{}, fmt.Errorf("build containerd 1.7: %w", err)
	}
	h := sha256.New()
	io.WriteString(h, goVersion+Containerd17Tags)
	for _, f := range []string{"go.mod", "go.sum", "integration/cmd/containerd17/main.go", "integration/cmd/containerd-shim-runc-v2/main.go"} {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			return ContainerdRuntime{}, fmt.Errorf("build containerd 1.7: %w", err)
		}
		fmt.Fprintf(h, "%s %d\n", f, len(b))
		h.Write(b)
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	cacheRoot, err := os.UserCacheDir()
	if err != nil {
		return ContainerdRuntime{}, fmt.Errorf("build containerd 1.7: cache directory: %w", err)
	}
	cacheRoot = filepath.Join(cacheRoot, "streamer")
	dir := filepath.Join(cacheRoot, "containerd17-"+key)
	rt := ContainerdRuntime{
		Name:   "containerd-1.7",
		Binary: filepath.Join(dir, "containerd17"),
		Shim:   filepath.Join(dir, "containerd-shim-runc-v2"),
	}
	if isExecutable(rt.Binary) && isExecutable(rt.Shim) {
		return rt, nil
	}
	if err := os.MkdirAll(cacheRoot, 0o755); err != nil {
		return ContainerdRuntime{}, fmt.Errorf("build containerd 1.7: %w", err)
	}
	tmp, err := os.MkdirTemp(cacheRoot, ".containerd17-build-")
	if err != nil {
		return ContainerdRuntime{}, fmt.Errorf("build containerd 1.7: %w", err)
	}
	defer os.RemoveAll(tmp)
	args := append([]string{"build", "-tags", Containerd17Tags, "-o", tmp + "/"}, containerd17Pkgs...)
	if out, err := RunCommandIn(ctx, root, gobin, args...); err != nil {
		return ContainerdRuntime{}, fmt.Errorf("build containerd 1.7 from the Go module: %w\n%s", err, out)
	}
	// Older builds are dead weight (about 100 MB each): keep one.
	if old, _ := filepath.Glob(filepath.Join(cacheRoot, "containerd17-*")); len(old) > 0 {
		for _, o := range old {
			_ = os.RemoveAll(o)
		}
	}
	// Rename makes the cache entry appear whole or not at all.
	if err := os.Rename(tmp, dir); err != nil && !isExecutable(rt.Binary) {
		return ContainerdRuntime{}, fmt.Errorf("build containerd 1.7: cache the binaries: %w", err)
	}
	return rt, nil
}

// goBinary is the go command: on PATH, else the standard install.
func goBinary() string {
	if p, err := execLookPath("go"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/local/go/bin/go"); err == nil {
		return "/usr/local/go/bin/go"
	}
	return "go"
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

// MajorMinor is "1.7" of a containerd version such as "v1.7.35",
// "1.6.20~ds1" or "1.7.35+unknown".
func MajorMinor(version string) string {
	v := strings.TrimPrefix(version, "v")
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 {
		return v
	}
	return parts[0] + "." + parts[1]
}

// ContainerdVersion runs `BINARY --version` (BINARY as StartContainerd
// resolves it: empty is the system containerd) and returns the version
// field, e.g. "1.6.20~ds1" or "1.7.35".
func ContainerdVersion(ctx context.Context, binary string) (string, error) {
	bin, err := containerdBinary(binary)
	if err != nil {
		return "", err
	}
	out, err := RunCommand(ctx, nil, bin, "--version")
	if err != nil {
		return "", fmt.Errorf("containerd version: %w", err)
	}
	// "containerd github.com/containerd/containerd 1.6.20~ds1 <revision>"
	f := strings.Fields(out)
	if len(f) < 3 || f[0] != "containerd" {
		return "", fmt.Errorf("containerd version: unexpected output of %s --version: %q", bin, out)
	}
	return f[2], nil
}
