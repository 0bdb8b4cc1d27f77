package harness

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Epoch is the modification time of every generated tar entry, so images are
// reproducible.
var Epoch = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// File is one tar entry of a generated layer. Type is a tar type flag
// (tar.TypeReg when zero).
type File struct {
	Name     string
	Type     byte
	Mode     int64
	UID, GID int
	Content  []byte
	Linkname string // symlink target or hardlink target name
	Devmajor int64
	Devminor int64
	// Xattrs are written as SCHILY.xattr PAX records.
	Xattrs map[string]string
}

// Reg is a regular file.
func Reg(name string, mode int64, content []byte) File {
	return File{Name: name, Type: tar.TypeReg, Mode: mode, Content: content}
}

// Dir is a directory.
func Dir(name string, mode int64) File { return File{Name: name, Type: tar.TypeDir, Mode: mode} }

// Symlink is a symbolic link to target.
func Symlink(name, target string) File {
	return File{Name: name, Type: tar.TypeSymlink, Mode: 0o777, Linkname: target}
}

// Hardlink is a hard link to the entry named target (same layer).
func Hardlink(name, target string) File {
	return File{Name: name, Type: tar.TypeLink, Linkname: target}
}

// CharDev is a character device.
func CharDev(name string, major, minor int64) File {
	return File{Name: name, Type: tar.TypeChar, Mode: 0o666, Devmajor: major, Devminor: minor}
}

// BlockDev is a block device.
func BlockDev(name string, major, minor int64) File {
	return File{Name: name, Type: tar.TypeBlock, Mode: 0o660, Devmajor: major, Devminor: minor}
}

// Fifo is a named pipe.
func Fifo(name string) File { return File{Name: name, Type: tar.TypeFifo, Mode: 0o644} }

// Whiteout deletes path (from lower layers) in an upper layer.
func Whiteout(path string) File {
	return Reg(filepath.Join(filepath.Dir(path), ".wh."+filepath.Base(path)), 0o644, nil)
}

// Opaque hides everything lower layers had in dir.
func Opaque(dir string) File { return Reg(filepath.Join(dir, ".wh..wh..opq"), 0o644, nil) }

// RandomBytes returns n pseudo-random (incompressible) bytes from seed.
func RandomBytes(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// Image describes a single-platform image.
type Image struct {
	Layers     [][]File
	Entrypoint []string
	Cmd        []string
	Env        []string
	// OS and Architecture default to linux and the host architecture (amd64).
	OS, Architecture, Variant string
	// LayerMediaType overrides the layers' media type (gzip bytes anyway),
	// to make images with media types a consumer does not support.
	LayerMediaType string
}

// Blob is a blob written to a layout.
type Blob struct {
	MediaType string
	Digest    digest.Digest
	Size      int64
	// DiffID is the uncompressed digest (layers only).
	DiffID digest.Digest
}

// BuiltImage is what WriteLayout wrote for one platform image.
type BuiltImage struct {
	Manifest Blob
	Config   Blob
	Layers   []Blob
	Platform ocispec.Platform
}

// CompressedSize is the sum of the image's layer sizes in the registry.
func (b BuiltImage) CompressedSize() int64 {
	var n int64
	for _, l := range b.Layers {
		n += l.Size
	}
	return n
}

// Layout is an OCI image layout directory with one tag.
type Layout struct {
	Dir string
	Tag string
	// Index is set when the tag names an image index (several images).
	Index  *Blob
	Images []BuiltImage
}

// Ref is the skopeo transport reference of the layout's tag.
func (l Layout) Ref() string { return "oci:" + l.Dir + ":" + l.Tag }

// TarLayer returns the uncompressed tar of files, in order.
func TarLayer(files []File) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	byName := map[string]File{}
	for _, f := range files {
		if f.Type == tar.TypeLink {
			// Real tar writers describe a hard link with its target's
			// metadata; extractors apply it to the shared inode.
			if target, ok := byName[f.Linkname]; ok {
				f.Mode, f.UID, f.GID, f.Xattrs = target.Mode, target.UID, target.GID, target.Xattrs
			}
		}
		byName[f.Name] = f
		typ := f.Type
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := f.Mode
		if mode == 0 {
			switch typ {
			case tar.TypeDir:
				mode = 0o755
			case tar.TypeSymlink:
				mode = 0o777
			default:
				mode = 0o644
			}
		}
		h := &tar.Header{
			Typeflag: typ, Name: f.Name, Mode: mode, Uid: f.UID, Gid: f.GID,
			ModTime: Epoch, Linkname: f.Linkname, Devmajor: f.Devmajor, Devminor: f.Devminor,
			Format: tar.FormatPAX,
		}
		if typ == tar.TypeDir && h.Name[len(h.Name)-1] != '/' {
			h.Name += "/"
		}
		if typ == tar.TypeReg {
			h.Size = int64(len(f.Content))
		}
		if len(f.Xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			keys := make([]string, 0, len(f.Xattrs))
			for k := range f.Xattrs {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				h.PAXRecords["SCHILY.xattr."+k] = f.Xattrs[k]
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("write tar header %s: %w", f.Name, err)
		}
		if typ == tar.TypeReg {
			if _, err := tw.Write(f.Content); err != nil {
				return nil, fmt.Errorf("write tar data %s: %w", f.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close tar: %w", err)
	}
	return buf.Bytes(), nil
}

// WriteLayout writes images into an OCI image layout at dir under tag. One
// image is tagged as its manifest; several are tagged as an image index.
func WriteLayout(dir, tag string, images ...Image) (Layout, error) {
	if len(images) == 0 {
		return Layout{}, fmt.Errorf("write layout %s: no image", dir)
	}
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return Layout{}, fmt.Errorf("write layout: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ocispec.ImageLayoutFile), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		return Layout{}, fmt.Errorf("write layout: %w", err)
	}
	lay := Layout{Dir: dir, Tag: tag}
	for i, img := range images {
		b, err := writeImage(dir, img)
		if err != nil {
			return Layout{}, fmt.Errorf("write image %d: %w", i, err)
		}
		lay.Images = append(lay.Images, b)
	}
	top := descriptor(lay.Images[0].Manifest)
	if len(images) > 1 {
		idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
		for _, b := range lay.Images {
			d := descriptor(b.Manifest)
			p := b.Platform
			d.Platform = &p
			idx.Manifests = append(idx.Manifests, d)
		}
		ib, err := writeJSON(dir, ocispec.MediaTypeImageIndex, idx)
		if err != nil {
			return Layout{}, err
		}
		lay.Index = &ib
		top = descriptor(ib)
	}
	top.Annotations = map[string]string{ocispec.AnnotationRefName: tag}
	index := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{top}}
	data, err := json.Marshal(index)
	if err != nil {
		return Layout{}, err
	}
	if err := os.WriteFile(filepath.Join(dir, "index.json"), data, 0o644); err != nil {
		return Layout{}, fmt.Errorf("write index.json: %w", err)
	}
	return lay, nil
}

func descriptor(b Blob) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: b.MediaType, Digest: b.Digest, Size: b.Size}
}

func writeBlob(dir, mediaType string, data []byte) (Blob, error) {
	d := digest.FromBytes(data)
	if err := os.WriteFile(filepath.Join(dir, "blobs", "sha256", d.Encoded()), data, 0o644); err != nil {
		return Blob{}, fmt.Errorf("write blob %s: %w", d, err)
	}
	return Blob{MediaType: mediaType, Digest: d, Size: int64(len(data))}, nil
}

func writeJSON(dir, mediaType string, v any) (Blob, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return Blob{}, fmt.Errorf("encode %s: %w", mediaType, err)
	}
	return writeBlob(dir, mediaType, data)
}

func writeImage(dir string, img Image) (BuiltImage, error) {
	plat := ocispec.Platform{OS: img.OS, Architecture: img.Architecture, Variant: img.Variant}
	if plat.OS == "" {
		plat.OS = "linux"
	}
	if plat.Architecture == "" {
		plat.Architecture = "amd64"
	}
	var out BuiltImage
	out.Platform = plat
	cfg := ocispec.Image{
		Platform: plat,
		Created:  &Epoch,
		Config:   ocispec.ImageConfig{Entrypoint: img.Entrypoint, Cmd: img.Cmd, Env: img.Env},
		RootFS:   ocispec.RootFS{Type: "layers"},
	}
	if len(cfg.Config.Env) == 0 {
		cfg.Config.Env = []string{"PATH=/bin:/usr/bin:/sbin:/usr/sbin"}
	}
	for i, files := range img.Layers {
		raw, err := TarLayer(files)
		if err != nil {
			return out, fmt.Errorf("layer %d: %w", i, err)
		}
		var gz bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
		if _, err := zw.Write(raw); err != nil {
			return out, err
		}
		if err := zw.Close(); err != nil {
			return out, err
		}
		mt := ocispec.MediaTypeImageLayerGzip
		if img.LayerMediaType != "" {
			mt = img.LayerMediaType
		}
		b, err := writeBlob(dir, mt, gz.Bytes())
		if err != nil {
			return out, err
		}
		b.DiffID = digest.Digest(fmt.Sprintf("sha256:%x", sha256.Sum256(raw)))
		out.Layers = append(out.Layers, b)
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, b.DiffID)
		cfg.History = append(cfg.History, ocispec.History{Created: &Epoch, CreatedBy: fmt.Sprintf("harness layer %d", i)})
	}
	var err error
	if out.Config, err = writeJSON(dir, ocispec.MediaTypeImageConfig, cfg); err != nil {
		return out, err
	}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: descriptor(out.Config)}
	for _, l := range out.Layers {
		m.Layers = append(m.Layers, descriptor(l))
	}
	if out.Manifest, err = writeJSON(dir, ocispec.MediaTypeImageManifest, m); err != nil {
		return out, err
	}
	return out, nil
}

// BusyboxLayer is a base layer with the host's static busybox at
// /bin/busybox, symlinks for the applets tests use, and the usual top-level
// directories.
func BusyboxLayer() ([]File, error) {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return nil, fmt.Errorf("read static busybox (Debian busybox-static): %w", err)
	}
	files := []File{
		Dir("bin", 0o755), Reg("bin/busybox", 0o755, bb),
		Dir("dev", 0o755), Dir("etc", 0o755), Dir("proc", 0o755), Dir("sys", 0o755),
		Dir("tmp", 0o1777), Dir("var", 0o755), Dir("www", 0o755),
		Reg("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")),
		Reg("etc/group", 0o644, []byte("root:x:0:\nnogroup:x:65534:\n")),
	}
	for _, a := range []string{"sh", "ls", "cat", "sleep", "httpd", "stat", "sha256sum", "wc", "head", "dd", "echo", "test", "true", "find", "readlink", "getfattr", "wget", "od", "env", "id"} {
		files = append(files, Symlink("bin/"+a, "busybox"))
	}
	return files, nil
}

// PauseImage is a sandbox (pause) image: static busybox sleeping until it
// is told to stop. Its layer differs from BusyboxLayer's, so images built on
// that share nothing with the pause image already on a node.
func PauseImage() (Image, error) {
	bb, err := BusyboxLayer()
	if err != nil {
		return Image{}, err
	}
	bb = append(bb, Reg("etc/pause", 0o644, []byte("sandbox\n")))
	return Image{
		Layers:     [][]File{bb},
		Entrypoint: []string{"/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"},
	}, nil
}

// WebImage is busybox serving /www/index.html (content page) with httpd on
// 127.0.0.1:port, plus extra layers.
func WebImage(page string, port int, extra ...[]File) (Image, error) {
	bb, err := BusyboxLayer()
	if err != nil {
		return Image{}, err
	}
	layers := [][]File{bb, {Dir("www", 0o755), Reg("www/index.html", 0o644, []byte(page))}}
	layers = append(layers, extra...)
	return Image{Layers: layers, Cmd: HTTPDCommand(port)}, nil
}

// HTTPDCommand is the command that serves /www on 127.0.0.1:port.
func HTTPDCommand(port int) []string {
	return []string{"/bin/busybox", "httpd", "-f", "-p", fmt.Sprintf("127.0.0.1:%d", port), "-h", "/www"}
}
