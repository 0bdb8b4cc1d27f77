// Package fdholder keeps open file descriptors for a daemon that may die:
// the /dev/fuse descriptors of streamer-snapshotter's mounts. A small
// long-lived process (Serve) receives descriptors over a unix socket
// (SCM_RIGHTS), keeps them, and hands duplicates back to the next daemon
// (Client), so that FUSE mounts outlive a restart of the daemon. The
// protocol is versioned; docs/restart.md describes it line by line.
package fdholder

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Version is the hand-over protocol version this package speaks. A holder
// answers requests of another version with an error naming both.
const Version = 1

// maxMessage bounds one message (JSON without descriptors).
const maxMessage = 64 << 10

// Operations of the protocol.
const (
	OpPut  = "put"  // keep the descriptor sent with the message, for Mountpoint, with State
	OpTake = "take" // send back a duplicate of the descriptor held for Mountpoint, and its State
	OpDrop = "drop" // close the descriptor held for Mountpoint
	OpList = "list" // name the mountpoints held
)

// Request is one message from a daemon to the holder.
type Request struct {
	Version    int    `json:"version"`
	Op         string `json:"op"`
	Mountpoint string `json:"mountpoint,omitempty"`
	State      []byte `json:"state,omitempty"`
}

// Response is the holder's answer to one Request. Take answers carry the
// descriptor as SCM_RIGHTS when Held is true.
type Response struct {
	Version     int      `json:"version"`
	Error       string   `json:"error,omitempty"`
	Held        bool     `json:"held,omitempty"`
	State       []byte   `json:"state,omitempty"`
	Mountpoints []string `json:"mountpoints,omitempty"`
}

// ServeOptions configure Serve.
type ServeOptions struct {
	// IdleExit ends Serve once nothing is held and no client has been
	// connected for this long; 0 never.
	IdleExit time.Duration
	// PruneInterval is how often held descriptors are checked for dead
	// connections (the mount went away); default 1s.
	PruneInterval time.Duration
	Logger        *logrus.Entry
}

type entry struct {
	fd    int
	state []byte
}

type holder struct {
	opts    ServeOptions
	log     *logrus.Entry
	mu      sync.Mutex
	held    map[string]entry
	clients int
	idle    time.Time // since when nothing is held and no client connected
}

// Serve answers clients on l until ctx is done or, with IdleExit, the
// holder has been idle that long. Held descriptors are closed when it
// returns.
func Serve(ctx context.Context, l *net.UnixListener, opts ServeOptions) error {
	if opts.PruneInterval <= 0 {
		opts.PruneInterval = time.Second
	}
	if opts.Logger == nil {
		opts.Logger = logrus.NewEntry(logrus.StandardLogger())
	}
	h := &holder{opts: opts, log: opts.Logger, held: map[string]entry{}, idle: time.Now()}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { <-ctx.Done(); l.Close() }()
	go h.prune(ctx, cancel)
	defer h.closeAll()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept holder client: %w", err)
		}
		h.mu.Lock()
		h.clients++
		h.mu.Unlock()
		go h.serveConn(c)
	}
}

func (h *holder) closeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for mp, e := range h.held {
		unix.Close(e.fd)
		delete(h.held, mp)
	}
}

// prune drops descriptors whose FUSE connection is gone (poll says
// POLLERR once the mount is unmounted) and ends an idle holder.
func (h *holder) prune(ctx context.Context, stop context.CancelFunc) {
	t := time.NewTicker(h.opts.PruneInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		h.mu.Lock()
		for mp, e := range h.held {
			fds := []unix.PollFd{{Fd: int32(e.fd)}} // no events: errors only
			if n, err := unix.Poll(fds, 0); err == nil && n > 0 && fds[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
				unix.Close(e.fd)
				delete(h.held, mp)
				h.log.WithFields(logrus.Fields{"op": "prune", "mountpoint": mp}).Info("mount is gone; descriptor dropped")
			}
		}
		if len(h.held) > 0 || h.clients > 0 {
			h.idle = time.Now()
		}
		idleFor := time.Since(h.idle)
		h.mu.Unlock()
		if h.opts.IdleExit > 0 && idleFor >= h.opts.IdleExit {
			h.log.Info("holding nothing and no daemon connected; exiting")
			stop()
			return
		}
	}
}

func (h *holder) serveConn(c *net.UnixConn) {
	defer func() {
		c.Close()
		h.mu.Lock()
		h.clients--
		h.idle = time.Now()
		h.mu.Unlock()
	}()
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil || n == 0 {
			return // client gone
		}
		var fds []int
		if oobn > 0 {
			fds = parseRights(oob[:oobn])
		}
		resp, fd := h.handle(buf[:n], fds)
		b, err := json.Marshal(resp)
		if err != nil {
			return
		}
		var rights []byte
		if fd >= 0 {
			rights = unix.UnixRights(fd)
		}
		_, _, err = c.WriteMsgUnix(b, rights, nil)
		if fd >= 0 {
			unix.Close(fd)
		}
		if err != nil {
			return
		}
	}
}

// handle answers one request; fds are the descriptors it carried. It
// returns a descriptor to send back (closed after sending), or -1.
func (h *holder) handle(msg []byte, fds []int) (Response, int) {
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	var req Request
	if err := json.Unmarshal(msg, &req); err != nil {
		closeAll()
		return Response{Version: Version, Error: fmt.Sprintf("bad request: %v", err)}, -1
	}
	if req.Version != Version {
		closeAll()
		return Response{Version: Version, Error: fmt.Sprintf("unsupported protocol version %d: this holder speaks version %d", req.Version, Version)}, -1
	}
	log := h.log.WithFields(logrus.Fields{"op": req.Op, "mountpoint": req.Mountpoint})
	h.mu.Lock()
	defer h.mu.Unlock()
	switch req.Op {
	case OpPut:
		if len(fds) != 1 || req.Mountpoint == "" {
			closeAll()
			return Response{Version: Version, Error: fmt.Sprintf("put needs a mountpoint and exactly one descriptor, got %d", len(fds))}, -1
		}
		if old, ok := h.held[req.Mountpoint]; ok {
			unix.Close(old.fd)
		}
		h.held[req.Mountpoint] = entry{fd: fds[0], state: req.State}
		log.Debug("holding descriptor")
		return Response{Version: Version, Held: true}, -1
	case OpTake:
		closeAll()
		e, ok := h.held[req.Mountpoint]
		if !ok {
			return Response{Version: Version}, -1
		}
		fd, err := unix.FcntlInt(uintptr(e.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return Response{Version: Version, Error: fmt.Sprintf("dup held descriptor: %v", err)}, -1
		}
		log.Debug("handing descriptor back")
		return Response{Version: Version, Held: true, State: e.state}, fd
	case OpDrop:
		closeAll()
		if e, ok := h.held[req.Mountpoint]; ok {
			unix.Close(e.fd)
			delete(h.held, req.Mountpoint)
			log.Debug("dropped descriptor")
		}
		return Response{Version: Version}, -1
	case OpList:
		closeAll()
		mps := make([]string, 0, len(h.held))
		for mp := range h.held {
			mps = append(mps, mp)
		}
		sort.Strings(mps)
		return Response{Version: Version, Mountpoints: mps}, -1
	default:
		closeAll()
		return Response{Version: Version, Error: fmt.Sprintf("unknown operation %q", req.Op)}, -1
	}
}

func parseRights(oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		if f, err := unix.ParseUnixRights(&m); err == nil {
			fds = append(fds, f...)
		}
	}
	return fds
}

// Listen creates the holder's socket at path (SOCK_SEQPACKET: one message
// per request, descriptors attached), replacing a stale socket file.
func Listen(path string) (*net.UnixListener, error) {
	if c, err := net.DialTimeout("unixpacket", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen %s: a holder is already serving there", path)
	}
	_ = os.Remove(path)
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	l.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	return l, nil
}

// Client talks to a holder. Its methods are safe for concurrent use; one
// connection carries requests one at a time, and a broken connection is
// dialed again once.
type Client struct {
	path string
	mu   sync.Mutex
	c    *net.UnixConn
}

// Dial connects to the holder at path.
func Dial(path string) (*Client, error) {
	cl := &Client{path: path}
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if err := cl.dial(); err != nil {
		return nil, err
	}
	return cl, nil
}

func (cl *Client) dial() error {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: cl.path, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("connect to descriptor holder %s: %w", cl.path, err)
	}
	cl.c = c
	return nil
}

// Close closes the connection; the holder keeps what it holds.
func (cl *Client) Close() error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.c == nil {
		return nil
	}
	err := cl.c.Close()
	cl.c = nil
	return err
}

// call sends req with the descriptor fd (-1: none) and returns the
// response and the descriptor it carried (nil if none).
func (cl *Client) call(req Request, fd int) (Response, *os.File, error) {
	req.Version = Version
	b, err := json.Marshal(req)
	if err != nil {
		return Response{}, nil, err
	}
	cl.mu.Lock()
	defer cl.mu.Unlock()
	var resp Response
	var file *os.File
	for attempt := 0; ; attempt++ {
		if cl.c == nil {
			if err = cl.dial(); err != nil {
				return resp, nil, err
			}
		}
		resp, file, err = cl.roundTrip(b, fd)
		if err == nil || attempt > 0 {
			break
		}
		cl.c.Close()
		cl.c = nil
	}
	if err != nil {
		return resp, nil, fmt.Errorf("descriptor holder %s: %s %s: %w", cl.path, req.Op, req.Mountpoint, err)
	}
	if resp.Error != "" {
		if file != nil {
			file.Close()
		}
		return resp, nil, fmt.Errorf("descriptor holder %s: %s %s: %s", cl.path, req.Op, req.Mountpoint, resp.Error)
	}
	return resp, file, nil
}

func (cl *Client) roundTrip(b []byte, fd int) (Response, *os.File, error) {
	var resp Response
	var rights []byte
	if fd >= 0 {
		rights = unix.UnixRights(fd)
	}
	cl.c.SetDeadline(time.Now().Add(10 * time.Second))
	defer cl.c.SetDeadline(time.Time{})
	if _, _, err := cl.c.WriteMsgUnix(b, rights, nil); err != nil {
		return resp, nil, err
	}
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := cl.c.ReadMsgUnix(buf, oob)
	if err != nil {
		return resp, nil, err
	}
	if n == 0 {
		return resp, nil, errors.New("holder closed the connection")
	}
	var file *os.File
	if oobn > 0 {
		if fds := parseRights(oob[:oobn]); len(fds) > 0 {
			for _, extra := range fds[1:] {
				unix.Close(extra)
			}
			file = os.NewFile(uintptr(fds[0]), "held")
		}
	}
	if err := json.Unmarshal(buf[:n], &resp); err != nil {
		if file != nil {
			file.Close()
		}
		return resp, nil, fmt.Errorf("bad response: %w", err)
	}
	return resp, file, nil
}

// withFD runs f with f's raw descriptor without f.Fd, which would switch
// a shared open file to blocking mode.
func withFD(file *os.File, f func(fd int) error) error {
	rc, err := file.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// Put hands the holder a duplicate of dev to keep for mountpoint, with
// state; dev stays open and usable by the caller.
func (cl *Client) Put(mountpoint string, dev *os.File, state []byte) error {
	return withFD(dev, func(fd int) error {
		_, _, err := cl.call(Request{Op: OpPut, Mountpoint: mountpoint, State: state}, fd)
		return err
	})
}

// Take returns a duplicate of the descriptor held for mountpoint and its
// state, or a nil file when none is held. The holder keeps its own.
func (cl *Client) Take(mountpoint string) (*os.File, []byte, error) {
	resp, f, err := cl.call(Request{Op: OpTake, Mountpoint: mountpoint}, -1)
	if err != nil {
		return nil, nil, err
	}
	if !resp.Held || f == nil {
		if f != nil {
			f.Close()
		}
		return nil, nil, nil
	}
	return f, resp.State, nil
}

// Drop makes the holder close the descriptor of mountpoint.
func (cl *Client) Drop(mountpoint string) error {
	_, _, err := cl.call(Request{Op: OpDrop, Mountpoint: mountpoint}, -1)
	return err
}

// List names the mountpoints held.
func (cl *Client) List() ([]string, error) {
	resp, _, err := cl.call(Request{Op: OpList}, -1)
	return resp.Mountpoints, err
}

// Ensure connects to the holder at path, starting one first if none
// answers: the executable exe run with args, in its own session so that
// signals to the daemon's process group never reach it. It waits up to
// timeout for the socket.
func Ensure(path, exe string, args []string, timeout time.Duration) (*Client, error) {
	if cl, err := Dial(path); err == nil {
		return cl, nil
	}
	cmd := exec.Command(exe, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer devnull.Close()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start descriptor holder: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps it if it ever exits before us
	deadline := time.Now().Add(timeout)
	for {
		cl, err := Dial(path)
		if err == nil {
			return cl, nil
		}
		select {
		case werr := <-exited:
			return nil, fmt.Errorf("descriptor holder exited at start (%v): %w", werr, err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("descriptor holder did not answer within %v: %w", timeout, err)
		}
	}
}
