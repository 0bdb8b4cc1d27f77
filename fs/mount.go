package fs

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/artifact"
)

// maxIO is the largest read the kernel sends and reads ahead: fewer, larger
// requests per chunk.
const maxIO = 1 << 20

// Mounted is a layer filesystem mounted on a directory.
type Mounted struct {
	mountpoint string
	server     *fuse.Server
	layer      *layer

	mu      sync.Mutex
	unmount bool
}

// Mount mounts the filesystem of the layer described by toc on mountpoint,
// read-only, reading file data through r. The caller must Unmount it.
func Mount(mountpoint string, toc *artifact.TOC, r ChunkReader, opts Options) (*Mounted, error) {
	root, err := newRoot(toc, r, opts)
	if err != nil {
		return nil, err
	}
	l := root.layer
	o := l.opts
	entry, attr, negative := o.EntryTimeout, o.AttrTimeout, o.NegativeTimeout
	fo := &gofs.Options{
		MountOptions: fuse.MountOptions{
			// Containers run as any user.
			AllowOther: true,
			FsName:     o.FSName,
			Name:       "streamer",
			// Read-only; nosuid and nodev protect the raw mount from what
			// a hostile layer carries. Overlayfs applies its own mount's
			// flags to files read through it, so containers still see
			// setuid binaries and devices work.
			Options:          []string{"ro", "nosuid", "nodev"},
			DirectMount:      true, // we are root: no fusermount3 needed
			DirectMountFlags: unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV,
			MaxWrite:         maxIO,
			MaxReadAhead:     maxIO,
			// Replies come from memory: splicing them through a pipe only
			// adds a copy.
			DisableSplice: true,
			Debug:         o.Debug,
		},
		// Mode 0000 is a real mode (e.g. /etc/shadow, whiteouts), not a
		// missing one.
		NullPermissions: true,
		EntryTimeout:    &entry,
		AttrTimeout:     &attr,
		NegativeTimeout: &negative,
	}
	server, err := gofs.Mount(mountpoint, root, fo)
	if err != nil {
		return nil, fmt.Errorf("mount layer %s on %s: %w", toc.Layer, mountpoint, err)
	}
	l.log.WithFields(logrus.Fields{"op": "mount", "mountpoint": mountpoint, "entries": l.entries}).Debug("layer mounted")
	return &Mounted{mountpoint: mountpoint, server: server, layer: l}, nil
}

// Mountpoint returns the directory the layer is mounted on.
func (m *Mounted) Mountpoint() string { return m.mountpoint }

// Stats returns what the filesystem has served so far.
func (m *Mounted) Stats() Stats { return m.layer.stats() }

// Unmount unmounts the layer. When the mount is busy it is detached lazily:
// it disappears from the namespace now and is released by the kernel when
// its last user goes. Calling it again does nothing.
func (m *Mounted) Unmount() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.unmount {
		return nil
	}
	log := m.layer.log.WithField("mountpoint", m.mountpoint)
	if err := m.server.Unmount(); err != nil {
		if derr := unix.Unmount(m.mountpoint, unix.MNT_DETACH); derr != nil && !errors.Is(derr, syscall.EINVAL) {
			return fmt.Errorf("unmount layer %s from %s: %w (lazy detach: %w)", m.layer.toc.Layer, m.mountpoint, err, derr)
		}
		log.WithError(err).Warn("layer busy, detached lazily")
		// The server keeps answering current users until the kernel
		// closes the connection; its loops then end by themselves.
		go func() {
			start := time.Now()
			m.server.Wait()
			log.WithField("after", time.Since(start)).Debug("lazily detached layer released")
		}()
	}
	m.unmount = true
	log.WithField("op", "unmount").Debug("layer unmounted")
	return nil
}
