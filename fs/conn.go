package fs

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// FUSE wire facts (include/uapi/linux/fuse.h).
const (
	inHeaderSize  = 40 // len, opcode, unique, nodeid, uid, gid, pid, extlen, padding
	outHeaderSize = 16 // len, error, unique
	opInit        = 26
	// notifyResend asks the kernel to queue again every request that was
	// read from the connection but not answered (Linux 6.9+): the
	// requests a killed daemon had in flight.
	notifyResend = 7
	// maxInflight bounds the requests of one mount handled at once.
	maxInflight = 64
	// handOverWait bounds how long a handing-over daemon waits for the
	// requests it is handling; the rest are resent to the next daemon.
	handOverWait = 2 * time.Second
)

// conn serves the FUSE requests of one mount from a /dev/fuse descriptor,
// through go-fuse's protocol server (request parsing and reply encoding) and
// rawFS. Unlike go-fuse's Server it can start on a connection that is
// already initialized: the one a previous daemon left behind.
type conn struct {
	// dev is this process's /dev/fuse descriptor, non-blocking. It is
	// never put in Go's poller: epoll_ctl on a file of the mount (which
	// os.Open does) would ask the FUSE server to poll while holding the
	// epoll lock the server's own reads would wait for. The read loop
	// uses poll(2) on its own thread instead.
	dev   int
	ps    *fuse.ProtocolServer
	log   *logrus.Entry
	stats *FUSEStats // or nil
	// stopR and stopW are a pipe: closing stopW stops the read loop.
	stopR, stopW *os.File

	sem  chan struct{} // one token per request being handled
	wg   sync.WaitGroup
	done chan struct{} // closed when the read loop ended

	closeOnce sync.Once
	// wmu keeps dev open while a write uses it: once closed, its number
	// may belong to another file (another mount's /dev/fuse), which must
	// never get a reply or a page-cache push meant for this mount.
	wmu    sync.RWMutex
	closed bool
}

var bufPool = sync.Pool{New: func() any {
	b := make([]byte, outHeaderSize+4096+maxIO)
	return &b
}}

func mountOptions(o Options) *fuse.MountOptions {
	return &fuse.MountOptions{
		AllowOther:    true,
		FsName:        o.FSName,
		Name:          "streamer",
		MaxWrite:      maxIO,
		MaxReadAhead:  maxIO,
		DisableSplice: true,
		Debug:         o.Debug,
	}
}

func newConn(fd int, fs *rawFS, o Options) (*conn, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("set /dev/fuse non-blocking: %w", err)
	}
	stopR, stopW, err := os.Pipe()
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("stop pipe: %w", err)
	}
	return &conn{
		dev:   fd,
		ps:    fuse.NewProtocolServer(fs, mountOptions(o)),
		log:   fs.layer.log,
		stats: o.FUSEStats,
		stopR: stopR,
		stopW: stopW,
		sem:   make(chan struct{}, maxInflight),
		done:  make(chan struct{}),
	}, nil
}

func (c *conn) fd() int { return c.dev }

// file returns a duplicate of the descriptor, for a Holder. The
// duplicate shares the open file (and its flags) with dev.
func (c *conn) file() (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(c.dev), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup /dev/fuse descriptor: %w", err)
	}
	return os.NewFile(uintptr(fd), "/dev/fuse"), nil
}

// dupFile duplicates f's descriptor without f.Fd, which would switch the
// shared open file to blocking mode.
func dupFile(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	cerr := rc.Control(func(raw uintptr) {
		fd, err = unix.FcntlInt(raw, unix.F_DUPFD_CLOEXEC, 0)
	})
	if cerr != nil {
		return -1, cerr
	}
	return fd, err
}

// read reads one request into buf. It waits with poll(2) for a request or
// stop, up to timeout (negative: no limit); os.ErrClosed means stopped,
// os.ErrDeadlineExceeded timed out, ENODEV unmounted.
func (c *conn) read(buf []byte, timeout time.Duration) (int, error) {
	ms := -1
	if timeout >= 0 {
		ms = int(timeout / time.Millisecond)
	}
	for {
		fds := []unix.PollFd{{Fd: int32(c.fd()), Events: unix.POLLIN}, {Fd: int32(c.stopR.Fd()), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, ms)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("poll /dev/fuse: %w", err)
		}
		if n == 0 {
			return 0, os.ErrDeadlineExceeded
		}
		if fds[1].Revents != 0 {
			return 0, os.ErrClosed
		}
		r, err := unix.Read(c.fd(), buf)
		switch {
		case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
			continue // another reader took it, or it was interrupted
		case err != nil:
			return 0, err
		}
		return r, nil
	}
}

// write writes one reply; writes to /dev/fuse never block.
func (c *conn) write(b []byte) error {
	_, err := c.writev(b)
	return err
}

// isClosed reports whether the conn was closed (unmounted or handed over).
func (c *conn) isClosed() bool {
	c.wmu.RLock()
	defer c.wmu.RUnlock()
	return c.closed
}

// writev writes one message made of bufs, unless the conn is closed.
func (c *conn) writev(bufs ...[]byte) (int, error) {
	c.wmu.RLock()
	defer c.wmu.RUnlock()
	if c.closed {
		return 0, os.ErrClosed
	}
	return unix.Writev(c.dev, bufs)
}

// mountNew opens /dev/fuse, mounts it on mountpoint (read-only, nosuid,
// nodev, allow_other) and answers the kernel's INIT. It returns the conn,
// not yet serving, and the state a Holder keeps for it.
func mountNew(mountpoint string, fs *rawFS, o Options) (*conn, []byte, error) {
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return nil, nil, fmt.Errorf("stat mountpoint: %w", err)
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/fuse: %w", err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=%o,user_id=%d,group_id=%d,max_read=%d,allow_other",
		fd, st.Mode&unix.S_IFMT, os.Geteuid(), os.Getegid(), maxIO)
	// Read-only; nosuid and nodev protect the raw mount from what a
	// hostile layer carries. Overlayfs applies its own mount's flags to
	// files read through it, so containers still see setuid binaries and
	// devices work.
	flags := uintptr(unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
	if err := unix.Mount(o.FSName, mountpoint, "fuse.streamer", flags, data); err != nil {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("mount(2): %w", err)
	}
	c, err := newConn(fd, fs, o)
	if err != nil {
		unix.Unmount(mountpoint, unix.MNT_DETACH)
		return nil, nil, err
	}
	fail := func(err error) (*conn, []byte, error) {
		unix.Unmount(mountpoint, unix.MNT_DETACH)
		c.close()
		return nil, nil, err
	}
	// The kernel sends INIT first, at once.
	buf := make([]byte, outHeaderSize+4096+maxIO)
	n, err := c.read(buf, 10*time.Second)
	if err != nil {
		return fail(fmt.Errorf("read INIT: %w", err))
	}
	if n < inHeaderSize || binary.LittleEndian.Uint32(buf[4:8]) != opInit {
		return fail(fmt.Errorf("first request is not INIT (%d bytes)", n))
	}
	init := bytes.Clone(buf[:n])
	out := make([]byte, 4096)
	rn, code := c.ps.HandleRequest([][]byte{init}, [][]byte{out})
	if !code.Ok() || rn < outHeaderSize {
		return fail(fmt.Errorf("answer INIT: %v", code))
	}
	reply := bytes.Clone(out[:rn])
	if err := c.write(reply); err != nil {
		return fail(fmt.Errorf("write INIT reply: %w", err))
	}
	info, err := topMount(mountpoint)
	if err != nil || info == nil {
		return fail(fmt.Errorf("find the new mount in the mount table: %v", err))
	}
	state, err := json.Marshal(mountState{
		Version: mountStateVersion, Layer: fs.layer.toc.Layer,
		Entries: len(fs.layer.toc.Entries), Chunks: len(fs.layer.toc.Chunks),
		Major: info.Major, Minor: info.Minor, Init: init, Reply: reply,
	})
	if err != nil {
		return fail(err)
	}
	return c, state, nil
}

// resumeConn takes over the live mount whose descriptor is dev: it replays
// the kernel's INIT into a fresh protocol server (no reply: the kernel got
// one from the first daemon) and asks the kernel to resend what the last
// daemon read but never answered. The conn is serving when it returns.
func resumeConn(dev *os.File, st *mountState, fs *rawFS, o Options) (*conn, error) {
	fd, err := dupFile(dev)
	dev.Close()
	if err != nil {
		return nil, fmt.Errorf("dup held descriptor: %w", err)
	}
	c, err := newConn(fd, fs, o)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 4096)
	rn, code := c.ps.HandleRequest([][]byte{st.Init}, [][]byte{out})
	if !code.Ok() {
		c.close()
		return nil, fmt.Errorf("replay INIT: %v", code)
	}
	if !bytes.Equal(out[:rn], st.Reply) {
		c.log.WithField("op", "resume").Warn("this daemon would negotiate other FUSE settings than the kernel got; serving with the kernel's request as replayed")
	}
	go c.serve()
	var h [outHeaderSize]byte
	binary.LittleEndian.PutUint32(h[0:4], outHeaderSize)
	binary.LittleEndian.PutUint32(h[4:8], notifyResend)
	if err := c.write(h[:]); err != nil {
		c.log.WithError(err).WithField("op", "resume").Warn("kernel cannot resend requests (needs Linux 6.9): requests the previous daemon had in flight stay unanswered")
	}
	return c, nil
}

// serve reads requests until the mount goes away (ENODEV) or stop, and
// handles each in its own goroutine, at most maxInflight at once.
func (c *conn) serve() {
	defer close(c.done)
	buf := make([]byte, outHeaderSize+4096+maxIO)
	for {
		c.sem <- struct{}{}
		n, err := c.read(buf, -1)
		if err != nil {
			<-c.sem
			switch {
			case errors.Is(err, syscall.ENOENT):
				continue // the request was interrupted before we read it
			case errors.Is(err, os.ErrClosed):
				return // handing over: stop closes the descriptor
			case errors.Is(err, syscall.ENODEV):
				// Unmounted: the kernel closed the connection.
			default:
				c.log.WithError(err).WithField("op", "serve").Error("read from /dev/fuse failed; the mount is no longer served")
			}
			go func() { c.wg.Wait(); c.close() }()
			return
		}
		req := bytes.Clone(buf[:n])
		c.wg.Add(1)
		go c.handle(req)
	}
}

func (c *conn) handle(req []byte) {
	start := time.Now()
	defer c.wg.Done()
	defer func() { <-c.sem }()
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	out := *bp
	n, code := c.ps.HandleRequest([][]byte{req}, [][]byte{out})
	if !code.Ok() && len(req) >= inHeaderSize {
		// go-fuse could not encode an answer: fail the request rather
		// than leave its caller waiting.
		binary.LittleEndian.PutUint32(out[0:4], outHeaderSize)
		eio := -int32(syscall.EIO)
		binary.LittleEndian.PutUint32(out[4:8], uint32(eio))
		copy(out[8:16], req[8:16])
		n = outHeaderSize
	}
	if n == 0 {
		c.stats.observeRequest(req, time.Since(start))
		return // FORGET, INTERRUPT...: no reply
	}
	if err := c.write(out[:n]); err != nil && !errors.Is(err, syscall.ENOENT) {
		// ENOENT: the kernel no longer waits for it (interrupted).
		c.log.WithError(err).WithField("op", "reply").Debug("write FUSE reply")
	}
	c.stats.observeRequest(req, time.Since(start))
}

// stop stops reading, waits a bounded time for the requests being
// handled and closes this process's descriptor. The mount stays, alive as
// long as a Holder keeps its descriptor; requests left unanswered are
// resent to the next daemon.
func (c *conn) stop() {
	c.stopW.Close()
	<-c.done
	waited := make(chan struct{})
	go func() { c.wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(handOverWait):
		c.log.WithField("op", "handover").Warn("requests still in flight at hand-over; the next daemon gets them again")
	}
	c.close()
}

func (c *conn) close() {
	c.closeOnce.Do(func() {
		c.wmu.Lock()
		c.closed = true
		unix.Close(c.dev)
		c.wmu.Unlock()
		c.stopR.Close()
		c.stopW.Close()
	})
}

// wait waits at most d for the read loop to end (after an unmount).
func (c *conn) wait(d time.Duration) bool {
	select {
	case <-c.done:
		return true
	case <-time.After(d):
		return false
	}
}
