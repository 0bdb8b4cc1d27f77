package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"maps"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/storage"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"github.com/sirupsen/logrus"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
)

// restoreParallelism bounds how many layers are mounted at once at start.
const restoreParallelism = 4

func isRemote(labels map[string]string) bool { return labels[LabelRemote] == "true" }

func layerFields(labels map[string]string) logrus.Fields {
	return logrus.Fields{"image": labels[LabelImageRef], "layer": labels[LabelLayerDigest]}
}

// prepareRemote tries to mount the layer for target remotely. On success the
// layer is committed as target and the answer is ErrAlreadyExists; on any
// failure to mount, the active snapshot key is returned as an ordinary one.
func (s *snapshotter) prepareRemote(ctx context.Context, key, parent, target string, labels map[string]string, opts []snapshots.Opt) ([]mount.Mount, error) {
	if err := s.ensureParents(ctx, parent); err != nil {
		return nil, err
	}
	snap, err := s.create(ctx, snapshots.KindActive, key, parent, opts)
	if err != nil {
		return nil, err
	}
	mp := s.upper(snap.ID)
	lg := log.G(ctx).WithFields(layerFields(labels)).WithFields(logrus.Fields{"key": key, "target": target})

	// fallback turns the active snapshot into an ordinary one, which needs
	// its directory free of any mount.
	fallback := func(reason error) ([]mount.Mount, error) {
		if errors.Is(reason, ErrNotStreamable) {
			lg.WithError(reason).Info("layer not streamable, falling back to a normal pull")
		} else {
			lg.WithError(reason).Warn("remote mount failed, falling back to a normal pull")
		}
		if err := s.unmount(ctx, mp); err != nil {
			if rerr := s.Remove(ctx, key); rerr != nil {
				lg.WithError(rerr).Warn("failed to remove snapshot after a failed remote mount")
			}
			return nil, fmt.Errorf("fall back to a normal pull of layer %s: %w", labels[LabelLayerDigest], err)
		}
		return s.mounts(snap), nil
	}

	// The parent's chain id lets the FileSystem bind the layer to the
	// image: chain id = sha256(parent + " " + diffID).
	labels = maps.Clone(labels)
	labels[LabelParent] = parent
	if err := s.fs.Mount(ctx, mp, labels); err != nil {
		return fallback(err)
	}
	usage, err := s.fs.Usage(ctx, mp)
	if err != nil {
		lg.WithError(err).Debug("usage of remote layer unknown at commit")
		usage = snapshots.Usage{}
	}
	committed := maps.Clone(labels)
	committed[LabelRemote] = "true"
	s.mu.Lock()
	s.remote[snap.ID] = committed
	s.mu.Unlock()
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, target, usage, snapshots.WithLabels(committed))
		return err
	})
	if err != nil {
		s.mu.Lock()
		delete(s.remote, snap.ID)
		s.mu.Unlock()
		if errdefs.IsAlreadyExists(err) {
			// Another Prepare for the same layer committed first: use its.
			lg.Debug("remote snapshot committed concurrently, dropping this one")
			if err := s.Remove(ctx, key); err != nil {
				lg.WithError(err).Warn("failed to remove duplicate remote snapshot")
			}
			return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
		}
		return fallback(fmt.Errorf("commit remote snapshot: %w", err))
	}
	lg.Info("layer mounted remotely")
	return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
}

// record is a snapshot as restore finds it in the metadata store.
type record struct {
	id, name string
	labels   map[string]string
}

// restore mounts again the remote snapshots of a previous run. A layer that
// fails to mount is kept: ensureRemote retries when it is next used.
func (s *snapshotter) restore(ctx context.Context) error {
	var recs, others []record
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			r := record{id: id, name: info.Name, labels: info.Labels}
			if info.Kind != snapshots.KindCommitted || !isRemote(info.Labels) {
				others = append(others, r)
				return nil
			}
			recs = append(recs, r)
			return nil
		})
	}); err != nil && !errdefs.IsNotFound(err) { // not found: a new store

		return fmt.Errorf("list remote snapshots to restore: %w", err)
	}
	ctx = log.WithLogger(ctx, s.logger)
	s.clearInterrupted(ctx, others)
	if len(recs) == 0 {
		return nil
	}
	if s.fs == nil {
		s.logger.WithField("snapshots", len(recs)).Error("remote snapshots exist but no remote filesystem is configured: their layers will be empty")
		return nil
	}
	var g errgroup.Group
	g.SetLimit(restoreParallelism)
	for _, r := range recs {
		s.remote[r.id] = r.labels
		g.Go(func() error {
			mp := s.upper(r.id)
			lg := s.logger.WithFields(layerFields(r.labels)).WithField("snapshot", r.name)
			// A mount left by a crashed run is dead: clear it first,
			// unless the FileSystem can take it over alive.
			if s.keep(mp) {
				lg.Debug("remote snapshot still mounted; taking it over")
			} else if err := s.unmount(ctx, mp); err != nil {
				lg.WithError(err).Error("failed to clear stale mount of remote snapshot")
				return nil
			}
			if err := s.fs.Mount(ctx, mp, r.labels); err != nil {
				lg.WithError(err).Error("FAILED TO RESTORE REMOTE SNAPSHOT: its layer is unavailable until a remount succeeds")
				return nil
			}
			lg.Debug("remote snapshot restored")
			return nil
		})
	}
	_ = g.Wait()
	s.logger.WithField("snapshots", len(recs)).Info("remote snapshots restored")
	return nil
}

// clearInterrupted unmounts layers mounted for snapshots that are not
// committed remote snapshots: a daemon killed between mounting a layer and
// committing it (prepareRemote) leaves the mount on the active snapshot's
// directory, kept alive by the descriptor holder but served by no one, so
// anything that touches it (statfs, du) would hang. containerd failed that
// Prepare and garbage-collects the snapshot; the mount must go now.
func (s *snapshotter) clearInterrupted(ctx context.Context, recs []record) {
	// One read of the mount table, however many snapshots there are.
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(s.snapshotsDir()))
	if err != nil {
		s.logger.WithError(err).Warn("read mount table: mounts of interrupted remote prepares not cleared")
		return
	}
	mounted := map[string]bool{}
	for _, m := range ms {
		mounted[m.Mountpoint] = true
	}
	for _, r := range recs {
		mp := s.upper(r.id)
		if !mounted[mp] {
			continue
		}
		lg := s.logger.WithFields(layerFields(r.labels)).WithFields(logrus.Fields{"snapshot": r.name, "mountpoint": mp})
		if err := s.unmount(ctx, mp); err != nil {
			lg.WithError(err).Error("failed to clear the layer mount of an interrupted remote prepare")
			continue
		}
		lg.Warn("cleared the layer mount of an interrupted remote prepare")
	}
}

// ensureParents makes sure the remote layers under parent (parent included)
// are mounted.
func (s *snapshotter) ensureParents(ctx context.Context, parent string) error {
	if parent == "" || s.fs == nil {
		return nil
	}
	var ids []string
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		for name := parent; name != ""; {
			id, info, _, err := storage.GetInfo(ctx, name)
			if err != nil {
				return fmt.Errorf("get parent %s: %w", name, err)
			}
			ids = append(ids, id)
			name = info.Parent
		}
		return nil
	}); err != nil {
		return err
	}
	return s.ensureRemote(ctx, ids)
}

// ensureRemote checks the remote layers among ids and mounts again those
// that died.
func (s *snapshotter) ensureRemote(ctx context.Context, ids []string) error {
	if s.fs == nil {
		return nil
	}
	for _, id := range ids {
		s.mu.Lock()
		labels, ok := s.remote[id]
		s.mu.Unlock()
		if !ok {
			continue
		}
		mp := s.upper(id)
		if err := s.fs.Check(ctx, mp, labels); err == nil {
			continue
		}
		if err := s.remount(ctx, mp, labels); err != nil {
			return fmt.Errorf("layer %s of snapshot %s: %v: %w", labels[LabelLayerDigest], id, err, errdefs.ErrUnavailable)
		}
	}
	return nil
}

// remount mounts a dead remote layer again. Remounts are serialized and
// re-checked so concurrent users mount once.
func (s *snapshotter) remount(ctx context.Context, mp string, labels map[string]string) error {
	s.remountMu.Lock()
	defer s.remountMu.Unlock()
	lg := log.G(ctx).WithFields(layerFields(labels)).WithField("mountpoint", mp)
	err := s.fs.Check(ctx, mp, labels)
	if err == nil {
		return nil
	}
	lg.WithError(err).Warn("remote layer is not alive, mounting it again")
	if err := s.unmount(ctx, mp); err != nil {
		return err
	}
	if err := s.fs.Mount(ctx, mp, labels); err != nil {
		lg.WithError(err).Error("remount of remote layer failed")
		return fmt.Errorf("remount layer: %w", err)
	}
	lg.Info("remote layer mounted again")
	return nil
}

// unmount makes sure nothing is mounted at mp: the FileSystem unmounts its
// own mounts; anything left (a mount of a crashed run) is detached.
func (s *snapshotter) unmount(ctx context.Context, mp string) error {
	mounted, err := isMountPoint(mp)
	if err != nil || !mounted {
		return err
	}
	if s.fs != nil {
		if err := s.fs.Unmount(ctx, mp); err != nil {
			log.G(ctx).WithError(err).WithField("mountpoint", mp).Debug("filesystem unmount failed, detaching")
		}
		if mounted, err = isMountPoint(mp); err != nil || !mounted {
			return err
		}
	}
	// Mounts can be stacked; a bounded number of detaches clears them.
	for i := 0; mounted && i < 16; i++ {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount %s: %w", mp, err)
		}
		if mounted, err = isMountPoint(mp); err != nil {
			return err
		}
	}
	if mounted {
		return fmt.Errorf("unmount %s: still mounted", mp)
	}
	return nil
}

// isMountPoint reads the mount table, which works even when the mount's
// FUSE server is gone and stat would fail.
func isMountPoint(path string) (bool, error) {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(path))
	if err != nil {
		return false, fmt.Errorf("read mount table: %w", err)
	}
	return len(ms) > 0, nil
}
