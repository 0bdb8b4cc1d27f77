// Package snapshotter implements Streamer's containerd snapshotter: ordinary
// overlay snapshots, plus remote snapshots whose layer is mounted by a
// FileSystem (FUSE) instead of being downloaded and unpacked.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Labels the snapshotter reads or writes. The cri.* labels are set by
// containerd's CRI plugin (with disable_snapshot_annotations = false) or by a
// client using snapshotters.AppendInfoHandlerWrapper; the snapshotter passes
// them to the FileSystem untouched.
const (
	// LabelSnapshotRef names the committed snapshot (the chain id) that a
	// Prepare is meant to become: its presence makes the Prepare a candidate
	// for a remote snapshot.
	LabelSnapshotRef = "containerd.io/snapshot.ref"
	// LabelImageRef is the image reference being pulled.
	LabelImageRef = "containerd.io/snapshot/cri.image-ref"
	// LabelManifestDigest is the digest of the image's (platform) manifest.
	LabelManifestDigest = "containerd.io/snapshot/cri.manifest-digest"
	// LabelLayerDigest is the digest of the compressed layer to mount.
	LabelLayerDigest = "containerd.io/snapshot/cri.layer-digest"
	// LabelImageLayers lists the image's layer digests, comma separated.
	LabelImageLayers = "containerd.io/snapshot/cri.image-layers"
	// LabelRemote marks a committed snapshot whose content is a FileSystem
	// mount, so a restart can mount it again. Its value is "true".
	LabelRemote = "containerd.io/snapshot/streamer.remote"
	// LabelParent carries the parent's chain id to the FileSystem, which
	// checks that a layer's TOC belongs to the image (fs.LabelParent).
	LabelParent = "containerd.io/snapshot/streamer.parent"
)

// Forgetter is implemented by a FileSystem that keeps data of a layer
// (chunks, records) on the node: Forget is called once a remote snapshot is
// removed and its layer unmounted, so that data can be garbage-collected.
type Forgetter interface {
	Forget(ctx context.Context, labels map[string]string) error
}

// Keeper is implemented by a FileSystem whose mounts can outlive the
// daemon (a descriptor holder keeps their FUSE connections, see
// docs/restart.md). Keep reports whether the mount at mountpoint is to be
// left in place: at start, a live mount that Mount will take over instead
// of mounting again; at Close, a mount handed over to the next daemon.
type Keeper interface {
	Keep(mountpoint string) bool
}

// keep reports whether the FileSystem wants the mount at mp left alone.
func (s *snapshotter) keep(mp string) bool {
	k, ok := s.fs.(Keeper)
	return ok && k.Keep(mp)
}

// ErrNotStreamable is wrapped by FileSystem.Mount when the layer cannot be
// mounted remotely (no streaming artifact, or the lookup failed): the
// snapshotter then falls back to an ordinary snapshot.
var ErrNotStreamable = errors.New("layer is not streamable")

// FileSystem mounts layers remotely. The snapshotter knows nothing of FUSE
// or registries: everything behind a remote layer lives behind this.
type FileSystem interface {
	// Mount mounts the layer named by labels at mountpoint. It returns an
	// error wrapping ErrNotStreamable when the image has no streaming
	// artifact (or the lookup failed): the snapshotter then falls back to
	// an ordinary snapshot.
	Mount(ctx context.Context, mountpoint string, labels map[string]string) error
	// Check reports whether the mount at mountpoint is alive.
	Check(ctx context.Context, mountpoint string, labels map[string]string) error
	// Unmount unmounts the layer mounted at mountpoint.
	Unmount(ctx context.Context, mountpoint string) error
	// Usage returns the bytes the layer mounted there holds on this node
	// (its cached chunks).
	Usage(ctx context.Context, mountpoint string) (snapshots.Usage, error)
}

// Opt configures a snapshotter made by NewSnapshotter.
type Opt func(*options) error

type options struct {
	logger       *logrus.Entry
	mountOptions []string
}

// WithLogger sets the logger used where no request context carries one:
// restoring mounts at start and unmounting them in Close.
func WithLogger(l *logrus.Entry) Opt {
	return func(o *options) error {
		o.logger = l
		return nil
	}
}

// WithMountOptions adds options to every overlay mount the snapshotter
// returns (not to bind mounts).
func WithMountOptions(opts ...string) Opt {
	return func(o *options) error {
		o.mountOptions = append(o.mountOptions, opts...)
		return nil
	}
}

// snapshotter is Streamer's snapshots.Snapshotter. It also implements
// snapshots.Cleaner.
type snapshotter struct {
	root    string
	lock    *os.File // flock held on root while open
	ms      *storage.MetaStore
	fs      FileSystem // nil: every snapshot is ordinary
	logger  *logrus.Entry
	options []string // overlay mount options

	mu     sync.Mutex
	remote map[string]map[string]string // snapshot id -> labels, for remote snapshots
	closed bool

	remountMu sync.Mutex // serializes remounts of dead layers
}

var (
	_ snapshots.Snapshotter = (*snapshotter)(nil)
	_ snapshots.Cleaner     = (*snapshotter)(nil)
)

// NewSnapshotter opens (or creates) a snapshotter rooted at root, which
// also implements snapshots.Cleaner. fs may be
// nil, in which case every snapshot is ordinary. Remote snapshots left by a
// previous run are mounted again before NewSnapshotter returns, so the
// snapshotter is whole before it serves.
func NewSnapshotter(ctx context.Context, root string, fsys FileSystem, opts ...Opt) (snapshots.Snapshotter, error) {
	var o options
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	if o.logger == nil {
		o.logger = log.G(ctx)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create snapshotter root: %w", err)
	}
	// Mount tables show resolved absolute paths; so must our mountpoints.
	root, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("resolve snapshotter root: %w", err)
	}
	if root, err = filepath.EvalSymlinks(root); err != nil {
		return nil, fmt.Errorf("resolve snapshotter root: %w", err)
	}
	dtype, err := fs.SupportsDType(root)
	if err != nil {
		return nil, fmt.Errorf("check d_type support of %s: %w", root, err)
	}
	if !dtype {
		return nil, fmt.Errorf("%s does not support d_type, which overlayfs needs (xfs: reformat with ftype=1)", root)
	}
	if err := os.Mkdir(filepath.Join(root, "snapshots"), 0o700); err != nil && !os.IsExist(err) {
		return nil, fmt.Errorf("create snapshots directory: %w", err)
	}
	// The metadata store would wait forever for a root held by another
	// process: fail clearly instead.
	lock, err := lockRoot(root)
	if err != nil {
		return nil, err
	}
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("open snapshot metadata: %w", err)
	}
	mountOpts := o.mountOptions
	if !hasOption(mountOpts, "index") && supportsIndex() {
		// Layers are shared by many containers; the index would tie an
		// upper dir to one lower dir for good.
		mountOpts = append(mountOpts, "index=off")
	}
	s := &snapshotter{
		root:    root,
		lock:    lock,
		ms:      ms,
		fs:      fsys,
		logger:  o.logger,
		options: mountOpts,
		remote:  map[string]map[string]string{},
	}
	if err := s.restore(ctx); err != nil {
		ms.Close()
		lock.Close()
		return nil, err
	}
	return s, nil
}

func hasOption(opts []string, key string) bool {
	for _, o := range opts {
		if o == key || strings.HasPrefix(o, key+"=") {
			return true
		}
	}
	return false
}

func supportsIndex() bool {
	_, err := os.Stat("/sys/module/overlay/parameters/index")
	return err == nil
}

// Paths. Nothing else builds paths under root by hand.

func (s *snapshotter) snapshotsDir() string   { return filepath.Join(s.root, "snapshots") }
func (s *snapshotter) dir(id string) string   { return filepath.Join(s.root, "snapshots", id) }
func (s *snapshotter) upper(id string) string { return filepath.Join(s.root, "snapshots", id, "fs") }
func (s *snapshotter) work(id string) string  { return filepath.Join(s.root, "snapshots", id, "work") }

// Stat returns the info of an active or committed snapshot by name or key.
func (s *snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update updates the labels of a snapshot.
func (s *snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (newInfo snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		newInfo, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	return newInfo, err
}

// Usage returns the resources a snapshot takes on this node: for a remote
// snapshot, the chunks of its layer held locally; for an active one, its
// upper directory; for a committed one, what was measured at commit.
func (s *snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return snapshots.Usage{}, err
	}
	switch {
	case isRemote(info.Labels) && s.fs != nil:
		u, err := s.fs.Usage(ctx, s.upper(id))
		if err != nil {
			return snapshots.Usage{}, fmt.Errorf("usage of remote snapshot %s: %w", key, err)
		}
		return u, nil
	case info.Kind == snapshots.KindActive:
		du, err := fs.DiskUsage(ctx, s.upper(id))
		if err != nil {
			return snapshots.Usage{}, fmt.Errorf("usage of snapshot %s: %w", key, err)
		}
		return snapshots.Usage(du), nil
	}
	return usage, nil
}

// Prepare creates an active snapshot. With the LabelSnapshotRef label and a
// FileSystem, it first tries to mount the layer remotely: on success the
// snapshot is committed under the label's name and Prepare returns an error
// wrapping errdefs.ErrAlreadyExists, which tells containerd to skip the
// download. Otherwise it falls back to an ordinary active snapshot.
func (s *snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, opt := range opts {
		if err := opt(&base); err != nil {
			return nil, err
		}
	}
	if target := base.Labels[LabelSnapshotRef]; target != "" {
		if _, err := s.Stat(ctx, target); err == nil {
			return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
		}
		if s.fs != nil {
			return s.prepareRemote(ctx, key, parent, target, base.Labels, opts)
		}
	}
	return s.createSnapshot(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only view of parent.
func (s *snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.createSnapshot(ctx, snapshots.KindView, key, parent, opts)
}

// Mounts returns the mounts of an active or view snapshot. Remote layers
// under it are checked and mounted again if they died.
func (s *snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var snap storage.Snapshot
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		snap, err = storage.GetSnapshot(ctx, key)
		if err != nil {
			return fmt.Errorf("get mounts of snapshot %s: %w", key, err)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	if err := s.ensureRemote(ctx, snap.ParentIDs); err != nil {
		return nil, err
	}
	return s.mounts(snap), nil
}

// Commit commits the active snapshot key as name.
func (s *snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, _, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		du, err := fs.DiskUsage(ctx, s.upper(id))
		if err != nil {
			return fmt.Errorf("measure snapshot %s: %w", key, err)
		}
		if _, err := storage.CommitActive(ctx, key, name, snapshots.Usage(du), opts...); err != nil {
			return fmt.Errorf("commit snapshot %s: %w", key, err)
		}
		return nil
	})
}

// Remove removes a snapshot and its directory; a remote snapshot's layer is
// unmounted first.
func (s *snapshotter) Remove(ctx context.Context, key string) error {
	var removals []string
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		if _, _, err = storage.Remove(ctx, key); err != nil {
			return fmt.Errorf("remove snapshot %s: %w", key, err)
		}
		removals, err = s.cleanupDirectories(ctx)
		if err != nil {
			return fmt.Errorf("list directories to remove: %w", err)
		}
		return nil
	}); err != nil {
		return err
	}
	// The removal is committed: failures below only leave disk behind, for
	// Cleanup to retry.
	s.removeDirs(ctx, removals)
	return nil
}

// Walk calls fn for every snapshot matching the filters.
func (s *snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Cleanup removes directories of snapshots that no longer exist.
func (s *snapshotter) Cleanup(ctx context.Context) error {
	var removals []string
	// A write transaction keeps snapshots from being created while we scan.
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		removals, err = s.cleanupDirectories(ctx)
		return err
	}); err != nil {
		return fmt.Errorf("list directories to clean up: %w", err)
	}
	s.removeDirs(ctx, removals)
	return nil
}

// Close unmounts every remote layer the snapshotter mounted and closes the
// metadata store. Calling it again does nothing.
func (s *snapshotter) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	ids := make([]string, 0, len(s.remote))
	for id := range s.remote {
		ids = append(ids, id)
	}
	s.remote = map[string]map[string]string{}
	s.mu.Unlock()

	ctx := log.WithLogger(context.Background(), s.logger)
	var errs []error
	for _, id := range ids {
		if s.keep(s.upper(id)) {
			// Handed over: the FileSystem stopped serving it (when it
			// closes) and the next daemon takes it over.
			continue
		}
		if err := s.unmount(ctx, s.upper(id)); err != nil {
			errs = append(errs, err)
		}
	}
	if err := s.ms.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close snapshot metadata: %w", err))
	}
	s.lock.Close() // releases the flock
	return errors.Join(errs...)
}

// lockRoot takes an exclusive flock on root's lock file, failing at once if
// another process holds it.
func lockRoot(root string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(root, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock of root %s: %w", root, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("root %s is in use by another process (is another streamer-snapshotter running?)", root)
		}
		return nil, fmt.Errorf("lock root %s: %w", root, err)
	}
	return f, nil
}

// cleanupDirectories lists snapshot directories with no snapshot. It needs a
// transaction in ctx.
func (s *snapshotter) cleanupDirectories(ctx context.Context) ([]string, error) {
	ids, err := storage.IDMap(ctx)
	if err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(s.snapshotsDir())
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, e := range entries {
		if _, ok := ids[e.Name()]; !ok {
			dirs = append(dirs, filepath.Join(s.snapshotsDir(), e.Name()))
		}
	}
	return dirs, nil
}

// removeDirs removes snapshot directories, unmounting remote layers first. A
// directory whose layer is still mounted is left alone: RemoveAll must never
// walk into a mount.
func (s *snapshotter) removeDirs(ctx context.Context, dirs []string) {
	for _, dir := range dirs {
		id := filepath.Base(dir)
		s.mu.Lock()
		labels, remote := s.remote[id]
		delete(s.remote, id)
		s.mu.Unlock()
		mp := filepath.Join(dir, "fs")
		if err := s.unmount(ctx, mp); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Error("snapshot directory kept: its layer is still mounted")
			continue
		}
		if f, ok := s.fs.(Forgetter); ok && remote {
			if err := f.Forget(ctx, labels); err != nil {
				log.G(ctx).WithError(err).WithFields(layerFields(labels)).Warn("forget removed remote layer")
			}
		}
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("failed to remove snapshot directory")
		}
	}
}

func (s *snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) ([]mount.Mount, error) {
	if err := s.ensureParents(ctx, parent); err != nil {
		return nil, err
	}
	snap, err := s.create(ctx, kind, key, parent, opts)
	if err != nil {
		return nil, err
	}
	return s.mounts(snap), nil
}

// create records a new active or view snapshot and makes its directory.
func (s *snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (snap storage.Snapshot, err error) {
	var td string
	defer func() {
		if err != nil && td != "" {
			if err1 := os.RemoveAll(td); err1 != nil {
				log.G(ctx).WithError(err1).WithField("path", td).Warn("failed to remove temporary snapshot directory")
			}
		}
	}()
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		td, err = s.prepareDirectory(kind)
		if err != nil {
			return fmt.Errorf("create snapshot directory: %w", err)
		}
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return fmt.Errorf("create snapshot %s: %w", key, err)
		}
		if len(snap.ParentIDs) > 0 {
			st, err := os.Stat(s.upper(snap.ParentIDs[0]))
			if err != nil {
				return fmt.Errorf("stat parent of snapshot %s: %w", key, err)
			}
			stat := st.Sys().(*syscall.Stat_t)
			if err := os.Lchown(filepath.Join(td, "fs"), int(stat.Uid), int(stat.Gid)); err != nil {
				return fmt.Errorf("chown snapshot %s like its parent: %w", key, err)
			}
		}
		if err := os.Rename(td, s.dir(snap.ID)); err != nil {
			return fmt.Errorf("move snapshot directory into place: %w", err)
		}
		td = ""
		return nil
	})
	return snap, err
}

func (s *snapshotter) prepareDirectory(kind snapshots.Kind) (string, error) {
	td, err := os.MkdirTemp(s.snapshotsDir(), "new-")
	if err != nil {
		return "", err
	}
	if err := os.Mkdir(filepath.Join(td, "fs"), 0o755); err != nil {
		return td, err
	}
	if kind == snapshots.KindActive {
		if err := os.Mkdir(filepath.Join(td, "work"), 0o711); err != nil {
			return td, err
		}
	}
	return td, nil
}

// mounts computes the mounts of a snapshot from its record. A remote layer's
// directory is a FUSE mount, used as a lower directory like any other.
func (s *snapshotter) mounts(snap storage.Snapshot) []mount.Mount {
	if len(snap.ParentIDs) == 0 {
		// overlay needs at least one lower directory.
		ro := "rw"
		if snap.Kind == snapshots.KindView {
			ro = "ro"
		}
		return []mount.Mount{{Type: "bind", Source: s.upper(snap.ID), Options: []string{ro, "rbind"}}}
	}
	if snap.Kind == snapshots.KindView && len(snap.ParentIDs) == 1 {
		return []mount.Mount{{Type: "bind", Source: s.upper(snap.ParentIDs[0]), Options: []string{"ro", "rbind"}}}
	}
	opts := append([]string(nil), s.options...)
	if snap.Kind == snapshots.KindActive {
		opts = append(opts, "workdir="+s.work(snap.ID), "upperdir="+s.upper(snap.ID))
	}
	lowers := make([]string, len(snap.ParentIDs))
	for i, id := range snap.ParentIDs {
		lowers[i] = s.upper(id)
	}
	opts = append(opts, "lowerdir="+strings.Join(lowers, ":"))
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: opts}}
}
