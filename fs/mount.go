package fs

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"syscall"
	"time"

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
	conn       *conn
	layer      *layer
	holder     Holder // nil: the mount dies with this process
	held       bool   // holder keeps the descriptor

	mu      sync.Mutex
	unmount bool
}

// Mount mounts the filesystem of the layer described by toc on mountpoint,
// read-only, reading file data through r. The caller must Unmount it.
//
// With a Holder (Options.Holder, else the default one), the mount's
// /dev/fuse descriptor is handed to it, and a live mount at mountpoint
// whose descriptor the holder kept from an earlier process is taken over
// instead of mounted again: the kernel's node ids and open files of that
// mount keep working, because both come from the TOC alone.
func Mount(mountpoint string, toc *artifact.TOC, r ChunkReader, opts Options) (*Mounted, error) {
	fs, err := newRawFS(toc, r, opts)
	if err != nil {
		return nil, err
	}
	l := fs.layer
	o := l.opts
	h := o.Holder
	if h == nil {
		h = DefaultHolder()
	}
	log := l.log.WithField("mountpoint", mountpoint)
	m := &Mounted{mountpoint: mountpoint, layer: l, holder: h}
	if h != nil {
		start := time.Now()
		c, err := takeOver(h, mountpoint, fs, o)
		if err != nil {
			log.WithError(err).WithField("op", "resume").Warn("cannot take over the held mount; mounting again")
		}
		if c != nil {
			m.conn, m.held = c, true
			fs.setConn(c)
			register(m)
			log.WithFields(logrus.Fields{"op": "resume", "took": time.Since(start)}).Info("took over live layer mount")
			return m, nil
		}
	}
	c, state, err := mountNew(mountpoint, fs, o)
	if err != nil {
		return nil, fmt.Errorf("mount layer %s on %s: %w", toc.Layer, mountpoint, err)
	}
	m.conn = c
	fs.setConn(c)
	if h != nil {
		err := func() error {
			f, err := c.file()
			if err != nil {
				return err
			}
			defer f.Close()
			return h.Put(mountpoint, f, state)
		}()
		if err != nil {
			log.WithError(err).WithField("op", "mount").Warn("descriptor holder unavailable: this mount will not survive a restart of the daemon")
		} else {
			m.held = true
		}
	}
	go c.serve()
	if err := pollHack(mountpoint); err != nil {
		m.Unmount()
		return nil, fmt.Errorf("mount layer %s on %s: first poll: %w", toc.Layer, mountpoint, err)
	}
	register(m)
	log.WithFields(logrus.Fields{"op": "mount", "entries": l.entries}).Debug("layer mounted")
	return m, nil
}

// takeOver serves the mount held for mountpoint, if there is one and it is
// still the live mount of this layer; it returns nil otherwise.
func takeOver(h Holder, mountpoint string, fs *rawFS, o Options) (*conn, error) {
	activeMu.Lock()
	_, served := active[mountpoint]
	activeMu.Unlock()
	if served {
		return nil, nil // this process serves it already
	}
	dev, b, err := h.Take(mountpoint)
	if err != nil {
		return nil, fmt.Errorf("ask the descriptor holder: %w", err)
	}
	if dev == nil {
		return nil, nil
	}
	st, err := decodeMountState(b)
	if err == nil {
		err = st.matches(fs.layer.toc)
	}
	if err == nil {
		err = st.stillMounted(mountpoint)
	}
	if err != nil {
		dev.Close()
		if derr := h.Drop(mountpoint); derr != nil {
			err = errors.Join(err, derr)
		}
		return nil, err
	}
	return resumeConn(dev, st, fs, o)
}

func register(m *Mounted) {
	activeMu.Lock()
	active[m.mountpoint] = m
	activeMu.Unlock()
}

func unregister(m *Mounted) {
	activeMu.Lock()
	if active[m.mountpoint] == m {
		delete(active, m.mountpoint)
	}
	activeMu.Unlock()
}

// Mountpoint returns the directory the layer is mounted on.
func (m *Mounted) Mountpoint() string { return m.mountpoint }

// Stats returns what the filesystem has served so far.
func (m *Mounted) Stats() Stats { return m.layer.stats() }

// Unmount unmounts the layer. When the mount is busy it is detached lazily:
// it disappears from the namespace now and is released by the kernel when
// its last user goes. Calling it again does nothing. After HandOver, a
// mount a Holder keeps is not unmounted: this process only stops serving
// it, for the next daemon.
func (m *Mounted) Unmount() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.unmount {
		return nil
	}
	log := m.layer.log.WithField("mountpoint", m.mountpoint)
	if m.held && handingOver.Load() {
		m.conn.stop()
		m.unmount = true
		unregister(m)
		log.WithField("op", "handover").Info("stopped serving layer; it stays mounted for the next daemon")
		return nil
	}
	if err := unix.Unmount(m.mountpoint, 0); err != nil {
		if derr := unix.Unmount(m.mountpoint, unix.MNT_DETACH); derr != nil && !errors.Is(derr, syscall.EINVAL) {
			return fmt.Errorf("unmount layer %s from %s: %w (lazy detach: %w)", m.layer.toc.Layer, m.mountpoint, err, derr)
		}
		// The conn keeps answering current users until the kernel
		// closes the connection; its loop then ends by itself.
		log.WithError(err).Warn("layer busy, detached lazily")
	} else if !m.conn.wait(5 * time.Second) {
		log.Warn("layer unmounted but its connection is still open")
	}
	if m.held {
		if err := m.holder.Drop(m.mountpoint); err != nil {
			log.WithError(err).Warn("descriptor holder did not drop the unmounted layer")
		}
	}
	m.unmount = true
	unregister(m)
	log.WithField("op", "unmount").Debug("layer unmounted")
	return nil
}

// pollHack makes the kernel ask this mount's server to poll once, through
// go-fuse's reserved name, and learn from the ENOSYS answer never to ask
// again. Otherwise Go's own epoll registration of a file opened on the
// mount in this process (os.Open) would block in the kernel on a POLL
// request while holding a thread the runtime needs: a deadlock. The kernel
// remembers the answer per connection, so a daemon that takes a mount over
// need not ask again.
func pollHack(mountpoint string) error {
	fd, err := unix.Open(filepath.Join(mountpoint, pollHackName), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	_, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	return err
}

// pollHackName is the name go-fuse's protocol server answers itself at
// the root of every mount, for pollHack.
const pollHackName = ".go-fuse-epoll-hack"
