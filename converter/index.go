package converter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// indexFile is the layer index's name under Options.CacheDir.
const indexFile = "layers.json"

// maxIndexEntriesPerLayer bounds how many conversions of one layer the
// index remembers (one per repository, newest first).
const maxIndexEntriesPerLayer = 8

// indexEntry records one conversion of an original layer: where its
// streaming blob and TOC were pushed and with which options.
type indexEntry struct {
	Host       string             `json:"host"`
	Repository string             `json:"repository"`
	DiffID     digest.Digest      `json:"diffID"`
	ChunkSize  int64              `json:"chunkSize"`
	Level      int                `json:"level,omitempty"`
	Blob       ocispec.Descriptor `json:"blob"`
	TOC        ocispec.Descriptor `json:"toc"`
}

// layerIndex maps original layer digests to earlier conversions. It is a
// hint only: every entry is checked against the registry before use, so a
// stale, lost or corrupt index costs a conversion, never correctness.
type layerIndex struct {
	path string // "" when disabled

	mu     sync.Mutex
	Layers map[digest.Digest][]indexEntry `json:"layers"`
}

// openIndex loads the index from dir (see Options.CacheDir).
func openIndex(ctx context.Context, dir string) *layerIndex {
	idx := &layerIndex{Layers: map[digest.Digest][]indexEntry{}}
	switch dir {
	case "-":
		return idx
	case "":
		base, err := os.UserCacheDir()
		if err != nil {
			log.G(ctx).WithError(err).Warn("no cache directory: layer index disabled")
			return idx
		}
		dir = filepath.Join(base, "streamer")
	}
	idx.path = filepath.Join(dir, indexFile)
	b, err := os.ReadFile(idx.path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.G(ctx).WithError(err).WithField("path", idx.path).Warn("layer index unreadable, starting empty")
		}
		return idx
	}
	if err := json.Unmarshal(b, idx); err != nil || idx.Layers == nil {
		log.G(ctx).WithError(err).WithField("path", idx.path).Warn("layer index corrupt, starting empty")
		idx.Layers = map[digest.Digest][]indexEntry{}
	}
	return idx
}

// lookup returns the conversions of layer, those in host/repo first, then
// other repositories of host (mountable), then the rest.
func (x *layerIndex) lookup(layer digest.Digest, host, repo string) []indexEntry {
	x.mu.Lock()
	defer x.mu.Unlock()
	var same, mountable []indexEntry
	for _, e := range x.Layers[layer] {
		switch {
		case e.Host == host && e.Repository == repo:
			same = append(same, e)
		case e.Host == host:
			mountable = append(mountable, e)
		}
	}
	return append(same, mountable...)
}

// record remembers a conversion and saves the index (atomically: a reader
// never sees half a file). Failing to save is logged, not fatal.
func (x *layerIndex) record(ctx context.Context, layer digest.Digest, e indexEntry) {
	x.mu.Lock()
	defer x.mu.Unlock()
	list := []indexEntry{e}
	for _, old := range x.Layers[layer] {
		if (old.Host != e.Host || old.Repository != e.Repository) && len(list) < maxIndexEntriesPerLayer {
			list = append(list, old)
		}
	}
	x.Layers[layer] = list
	if x.path == "" {
		return
	}
	if err := x.save(); err != nil {
		log.G(ctx).WithError(err).WithField("path", x.path).Warn("layer index not saved")
	}
}

func (x *layerIndex) save() error {
	b, err := json.Marshal(x)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(x.path), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(x.path), indexFile+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), x.path); err != nil {
		return fmt.Errorf("replace layer index: %w", err)
	}
	return nil
}
