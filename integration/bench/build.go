package bench

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/integration/harness"
)

// Builder builds benchmark images into OCI layouts under CacheDir and
// keeps them there, keyed by recipe hash, so a rerun reuses them.
type Builder struct {
	CacheDir string
	// Logf prints progress.
	Logf func(format string, args ...any)
}

// Built is a built image: an OCI layout with one tag.
type Built struct {
	Recipe   Recipe
	Layout   string // layout directory
	Tag      string
	Manifest digest.Digest
	// Size is the sum of the compressed layers; Layers their count.
	Size   int64
	Layers []LayerInfo
}

// LayerInfo describes one layer of a built image.
type LayerInfo struct {
	Name   string
	Digest digest.Digest
	Size   int64
}

// Ref is the skopeo reference of the layout.
func (b Built) Ref() string { return "oci:" + b.Layout + ":" + b.Tag }

func (b *Builder) logf(format string, args ...any) {
	if b.Logf != nil {
		b.Logf(format, args...)
	}
}

// ErrNoDebootstrap is returned when a Debian image must be built and
// debootstrap is not installed.
var ErrNoDebootstrap = errors.New("debootstrap is missing: run `make bench-deps` (scripts/install-deps.sh --bench) or apt-get install debootstrap")

// Build returns the image of r, building it unless the cache has it.
func (b *Builder) Build(ctx context.Context, r Recipe) (Built, error) {
	short := filepath.Base(r.Name)
	dir := filepath.Join(b.CacheDir, "images", short+"-"+r.Hash())
	marker := filepath.Join(dir, "image.json")
	if data, err := os.ReadFile(marker); err == nil {
		var out Built
		if err := json.Unmarshal(data, &out); err == nil {
			b.logf("image %s: cached (%s, %d layers, %s)", short, r.Hash(), len(out.Layers), FmtBytes(out.Size))
			return out, nil
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return Built{}, fmt.Errorf("clear stale build of %s: %w", short, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Built{}, fmt.Errorf("build %s: %w", short, err)
	}
	start := time.Now()
	b.logf("image %s: building (recipe %s)", short, r.Hash())
	lw, err := newLayoutWriter(filepath.Join(dir, "layout"))
	if err != nil {
		return Built{}, err
	}
	if r.Debian != nil {
		err = b.buildDebian(ctx, r, dir, lw)
	} else {
		err = b.buildBusybox(ctx, r, lw)
	}
	if err != nil {
		return Built{}, fmt.Errorf("build image %s: %w", short, err)
	}
	out, err := lw.finish("v1", r)
	if err != nil {
		return Built{}, fmt.Errorf("build image %s: %w", short, err)
	}
	// The stage trees are only needed to build; the layout is the cache.
	_ = os.RemoveAll(filepath.Join(dir, "stages"))
	data, _ := json.MarshalIndent(out, "", "  ")
	if err := os.WriteFile(marker, data, 0o644); err != nil {
		return Built{}, fmt.Errorf("build image %s: %w", short, err)
	}
	b.logf("image %s: built in %v (%d layers, %s compressed)", short, time.Since(start).Round(time.Second), len(out.Layers), FmtBytes(out.Size))
	return out, nil
}

// buildBusybox builds busybox (the host's static one), an optional data
// layer of random files, and the stages' files.
func (b *Builder) buildBusybox(ctx context.Context, r Recipe, lw *layoutWriter) error {
	files, err := harness.BusyboxLayer()
	if err != nil {
		return err
	}
	raw, err := harness.TarLayer(files)
	if err != nil {
		return err
	}
	if err := lw.addLayer("base (busybox)", func(tw *tar.Writer) error {
		return copyTarEntries(tw, raw)
	}); err != nil {
		return err
	}
	if r.DataBytes > 0 {
		b.logf("image %s: writing %s of random data", filepath.Base(r.Name), FmtBytes(r.DataBytes))
		if err := lw.addLayer("data", func(tw *tar.Writer) error { return writeDataFiles(ctx, tw, r.DataBytes, DataFileSize) }); err != nil {
			return err
		}
	}
	for _, st := range r.Stages {
		if len(st.Packages) > 0 || st.Build != "" {
			return fmt.Errorf("stage %s: a busybox image cannot install packages", st.Name)
		}
		if err := lw.addLayer(st.Name, func(tw *tar.Writer) error { return writeFiles(tw, st.Files) }); err != nil {
			return err
		}
	}
	return nil
}

// DataFileSize is the size of each random file of a data layer (the last
// one is smaller when the total is not a multiple).
const DataFileSize = 512 << 20

// writeDataFiles writes total bytes of deterministic random data as
// data/blob-NNN.bin files of fileSize.
func writeDataFiles(ctx context.Context, tw *tar.Writer, total, fileSize int64) error {
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "data/", Mode: 0o755, ModTime: harness.Epoch}); err != nil {
		return err
	}
	rng := rand.NewChaCha8([32]byte{'s', 't', 'r', 'e', 'a', 'm', 'e', 'r'})
	for i := 0; total > 0; i++ {
		n := min(total, fileSize)
		total -= n
		h := &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("data/blob-%03d.bin", i), Mode: 0o644, Size: n, ModTime: harness.Epoch}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := io.CopyN(tw, rng, n); err != nil {
			return fmt.Errorf("write %s: %w", h.Name, err)
		}
	}
	return nil
}

// writeFiles writes files (path -> content) with their parent directories,
// in path order.
func writeFiles(tw *tar.Writer, files map[string]string) error {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	dirs := map[string]bool{}
	for _, n := range names {
		for d := filepath.Dir(n); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	var ds []string
	for d := range dirs {
		ds = append(ds, d)
	}
	sort.Strings(ds)
	for _, d := range ds {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: harness.Epoch}); err != nil {
			return err
		}
	}
	for _, n := range names {
		c := files[n]
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o644, Size: int64(len(c)), ModTime: harness.Epoch}); err != nil {
			return err
		}
		if _, err := io.WriteString(tw, c); err != nil {
			return err
		}
	}
	return nil
}

func copyTarEntries(tw *tar.Writer, raw []byte) error {
	tr := tar.NewReader(bytes.NewReader(raw))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return err
		}
	}
}

// baseDir is where the Debian base root filesystem of d is cached.
func (b *Builder) baseDir(d DebianBase) string {
	return filepath.Join(b.CacheDir, "base-"+d.Suite+"-"+d.Hash())
}

// debianBase returns the cached debootstrap tree of d, making it first.
func (b *Builder) debianBase(ctx context.Context, d DebianBase) (string, error) {
	dir := b.baseDir(d)
	rootfs := filepath.Join(dir, "rootfs")
	if _, err := os.Stat(filepath.Join(dir, "complete")); err == nil {
		return rootfs, nil
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return "", ErrNoDebootstrap
	}
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	b.logf("debootstrap --variant=%s %s from %s (about a minute)", d.Variant, d.Suite, d.Mirror)
	cctx, cancel := context.WithTimeout(ctx, 20*time.Minute)
	defer cancel()
	if _, err := harness.RunCommand(cctx, nil, "debootstrap", "--variant="+d.Variant, d.Suite, rootfs, d.Mirror); err != nil {
		return "", fmt.Errorf("debootstrap %s: %w", d.Suite, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "complete"), nil, 0o644); err != nil {
		return "", err
	}
	return rootfs, nil
}

// buildDebian makes the base layer from the debootstrap tree and one layer
// per stage: each stage installs its packages with apt in a chroot of an
// overlay mount whose upper directory becomes the layer, as image builders
// do.
func (b *Builder) buildDebian(ctx context.Context, r Recipe, dir string, lw *layoutWriter) error {
	base, err := b.debianBase(ctx, *r.Debian)
	if err != nil {
		return err
	}
	if err := lw.addLayer("base OS ("+r.Debian.Suite+")", func(tw *tar.Writer) error { return writeTree(tw, base) }); err != nil {
		return err
	}
	lowers := []string{base} // bottom first
	for i, st := range r.Stages {
		sdir := filepath.Join(dir, "stages", fmt.Sprintf("%d-%s", i, st.Name))
		upper := filepath.Join(sdir, "upper")
		if err := os.MkdirAll(upper, 0o755); err != nil {
			return err
		}
		if len(st.Packages) > 0 {
			b.logf("image %s: stage %s: apt-get install %s", filepath.Base(r.Name), st.Name, strings.Join(st.Packages, " "))
			if err := inOverlay(ctx, lowers, sdir, upper, func(root string) error {
				return aptInstall(ctx, root, st.Packages)
			}); err != nil {
				return fmt.Errorf("stage %s: %w", st.Name, err)
			}
		}
		if st.Build != "" {
			b.logf("image %s: stage %s: building (%s) with %s", filepath.Base(r.Name), st.Name, st.Build, strings.Join(st.BuildPackages, " "))
			scratch := filepath.Join(sdir, "scratch")
			if err := os.MkdirAll(filepath.Join(scratch, "upper"), 0o755); err != nil {
				return err
			}
			err := inOverlay(ctx, append(append([]string{}, lowers...), upper), scratch, filepath.Join(scratch, "upper"), func(root string) error {
				if err := writeFilesTo(root, st.Files); err != nil {
					return err
				}
				if len(st.BuildPackages) > 0 {
					if err := aptInstall(ctx, root, st.BuildPackages); err != nil {
						return err
					}
				}
				if _, err := chroot(ctx, root, st.Build); err != nil {
					return err
				}
				for _, o := range st.Outputs {
					data, err := os.ReadFile(filepath.Join(root, o))
					if err != nil {
						return fmt.Errorf("build output %s: %w", o, err)
					}
					if err := writeFileTo(upper, o, data); err != nil {
						return err
					}
				}
				return nil
			})
			_ = os.RemoveAll(scratch)
			if err != nil {
				return fmt.Errorf("stage %s: %w", st.Name, err)
			}
		}
		if err := writeFilesTo(upper, st.Files); err != nil {
			return fmt.Errorf("stage %s: %w", st.Name, err)
		}
		if err := lw.addLayer(st.Name, func(tw *tar.Writer) error { return writeTree(tw, upper) }); err != nil {
			return fmt.Errorf("stage %s: %w", st.Name, err)
		}
		lowers = append(lowers, upper)
	}
	return nil
}

func writeFileTo(root, name string, data []byte) error {
	p := filepath.Join(root, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	return os.WriteFile(p, data, 0o644)
}

func writeFilesTo(root string, files map[string]string) error {
	for n, c := range files {
		if err := writeFileTo(root, n, []byte(c)); err != nil {
			return err
		}
	}
	return nil
}

// inOverlay mounts an overlay of lowers (bottom first) with upper at
// dir/merged, mounts /proc in it, calls f with the merged root and
// unmounts everything, also on failure.
func inOverlay(ctx context.Context, lowers []string, dir, upper string, f func(root string) error) error {
	work := filepath.Join(dir, "work")
	merged := filepath.Join(dir, "merged")
	for _, d := range []string{work, merged} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	rev := make([]string, len(lowers))
	for i, l := range lowers {
		rev[len(lowers)-1-i] = l
	}
	opts := "lowerdir=" + strings.Join(rev, ":") + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		return fmt.Errorf("mount overlay at %s: %w", merged, err)
	}
	defer func() {
		_ = unix.Unmount(merged, unix.MNT_DETACH)
		_ = os.RemoveAll(work)
	}()
	proc := filepath.Join(merged, "proc")
	if err := unix.Mount("proc", proc, "proc", 0, ""); err != nil {
		return fmt.Errorf("mount proc in %s: %w", merged, err)
	}
	defer func() { _ = unix.Unmount(proc, unix.MNT_DETACH) }()
	return f(merged)
}

// chroot runs a shell script in root with a plain environment.
func chroot(ctx context.Context, root, script string) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, "chroot", root, "/bin/sh", "-ec", script)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LANG=C.UTF-8", "HOME=/root"}
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
		if len(lines) > 25 {
			lines = lines[len(lines)-25:]
		}
		return string(out), fmt.Errorf("chroot %s: %q: %w\n%s", root, script, err, strings.Join(lines, "\n"))
	}
	return string(out), nil
}

// aptInstall installs packages in root and leaves no apt lists or archives
// behind, as a Dockerfile's RUN apt-get line would.
func aptInstall(ctx context.Context, root string, pkgs []string) error {
	script := "apt-get update -qq && apt-get install -y -qq --no-install-recommends " + strings.Join(pkgs, " ") +
		" >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*"
	var err error
	for try := 0; try < 3; try++ {
		if _, err = chroot(ctx, root, script); err == nil {
			return nil
		}
		time.Sleep(time.Duration(try+1) * 5 * time.Second)
	}
	return fmt.Errorf("apt-get install %s: %w", strings.Join(pkgs, " "), err)
}

// skipContent are the directories whose content never goes into a layer:
// kernel and runtime mounts, and apt's lists and archives.
var skipContent = map[string]bool{
	"dev": true, "proc": true, "sys": true, "tmp": true, "run": true,
	"var/lib/apt/lists": true, "var/cache/apt": true,
}

// writeTree writes the tree at root as a layer: entries in path order,
// hard links as links, overlay whiteouts (0/0 character devices) as
// .wh. files and opaque directories with .wh..wh..opq.
func writeTree(tw *tar.Writer, root string) error {
	inodes := map[uint64]string{}
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		rel = filepath.ToSlash(rel)
		parent := filepath.ToSlash(filepath.Dir(rel))
		for dir := parent; dir != "."; dir = filepath.ToSlash(filepath.Dir(dir)) {
			if skipContent[dir] {
				if d.IsDir() {
					return fs.SkipDir
				}
				return nil
			}
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode()&fs.ModeCharDevice != 0 && st.Rdev == 0 {
			wh := filepath.ToSlash(filepath.Join(parent, ".wh."+d.Name()))
			return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: wh, Mode: 0o644, ModTime: harness.Epoch})
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return fmt.Errorf("tar header of %s: %w", p, err)
		}
		h.Name, h.Uname, h.Gname = rel, "", ""
		h.AccessTime, h.ChangeTime = time.Time{}, time.Time{}
		h.Uid, h.Gid = int(st.Uid), int(st.Gid)
		if fi.IsDir() {
			h.Name += "/"
		}
		if fi.Mode().IsRegular() && st.Nlink > 1 {
			if first, ok := inodes[st.Ino]; ok {
				h.Typeflag, h.Linkname, h.Size = tar.TypeLink, first, 0
			} else {
				inodes[st.Ino] = rel
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("write %s: %w", rel, err)
		}
		if fi.IsDir() {
			buf := make([]byte, 8)
			if n, err := unix.Lgetxattr(p, "trusted.overlay.opaque", buf); err == nil && string(buf[:n]) == "y" {
				return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel + "/.wh..wh..opq", Mode: 0o644, ModTime: harness.Epoch})
			}
			return nil
		}
		if h.Typeflag == tar.TypeReg {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			if err != nil {
				return fmt.Errorf("write %s: %w", rel, err)
			}
		}
		return nil
	})
}

// layoutWriter writes an OCI image layout, one gzip layer at a time.
type layoutWriter struct {
	dir     string
	layers  []ocispec.Descriptor
	names   []string
	diffIDs []digest.Digest
}

func newLayoutWriter(dir string) (*layoutWriter, error) {
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return nil, fmt.Errorf("layout %s: %w", dir, err)
	}
	if err := os.WriteFile(filepath.Join(dir, ocispec.ImageLayoutFile), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		return nil, fmt.Errorf("layout %s: %w", dir, err)
	}
	return &layoutWriter{dir: dir}, nil
}

type hashWriter struct {
	w io.Writer
	h hash.Hash
	n int64
}

func (h *hashWriter) Write(p []byte) (int, error) {
	n, err := h.w.Write(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

// addLayer writes one layer: fill writes tar entries; the tar is gzipped
// into a blob, hashing both forms on the way.
func (l *layoutWriter) addLayer(name string, fill func(tw *tar.Writer) error) error {
	f, err := os.CreateTemp(filepath.Join(l.dir, "blobs", "sha256"), ".layer-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	comp := &hashWriter{w: f, h: sha256.New()}
	zw, err := gzip.NewWriterLevel(comp, gzip.BestSpeed)
	if err != nil {
		return err
	}
	raw := &hashWriter{w: zw, h: sha256.New()}
	tw := tar.NewWriter(raw)
	if err := fill(tw); err != nil {
		return fmt.Errorf("layer %s: %w", name, err)
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("layer %s: %w", name, err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("layer %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	d := digest.NewDigest(digest.SHA256, comp.h)
	if err := os.Rename(f.Name(), filepath.Join(l.dir, "blobs", "sha256", d.Encoded())); err != nil {
		return err
	}
	l.layers = append(l.layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: d, Size: comp.n})
	l.names = append(l.names, name)
	l.diffIDs = append(l.diffIDs, digest.NewDigest(digest.SHA256, raw.h))
	return nil
}

func (l *layoutWriter) blob(mediaType string, v any) (ocispec.Descriptor, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	d := digest.FromBytes(data)
	if err := os.WriteFile(filepath.Join(l.dir, "blobs", "sha256", d.Encoded()), data, 0o644); err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}, nil
}

// finish writes the config, the manifest and index.json tagging it.
func (l *layoutWriter) finish(tag string, r Recipe) (Built, error) {
	cfg := ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		Created:  &harness.Epoch,
		Config: ocispec.ImageConfig{
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"},
			Cmd: r.CommandFor(8080),
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: l.diffIDs},
	}
	for _, n := range l.names {
		cfg.History = append(cfg.History, ocispec.History{Created: &harness.Epoch, CreatedBy: "streamer bench: " + n})
	}
	cd, err := l.blob(ocispec.MediaTypeImageConfig, cfg)
	if err != nil {
		return Built{}, err
	}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: cd, Layers: l.layers}
	md, err := l.blob(ocispec.MediaTypeImageManifest, m)
	if err != nil {
		return Built{}, err
	}
	md.Annotations = map[string]string{ocispec.AnnotationRefName: tag}
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{md}}
	data, err := json.Marshal(idx)
	if err != nil {
		return Built{}, err
	}
	if err := os.WriteFile(filepath.Join(l.dir, "index.json"), data, 0o644); err != nil {
		return Built{}, err
	}
	out := Built{Recipe: r, Layout: l.dir, Tag: tag, Manifest: md.Digest}
	for i, ld := range l.layers {
		out.Size += ld.Size
		out.Layers = append(out.Layers, LayerInfo{Name: l.names[i], Digest: ld.Digest, Size: ld.Size})
	}
	return out, nil
}
