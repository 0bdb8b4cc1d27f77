package fdholder

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

func startHolder(t *testing.T, opts ServeOptions) (string, <-chan error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "h.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	if opts.Logger == nil {
		lg := logrus.New()
		lg.SetOutput(io.Discard)
		opts.Logger = logrus.NewEntry(lg)
	}
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() { done <- Serve(ctx, l, opts); close(finished) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(5 * time.Second):
			t.Error("holder did not stop")
		}
	})
	return path, done
}

func dial(t *testing.T, path string) *Client {
	t.Helper()
	cl, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

func TestPutTakeDrop(t *testing.T) {
	path, _ := startHolder(t, ServeOptions{})
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cl := dial(t, path)
	if err := cl.Put("/mnt/a", w, []byte("state-a")); err != nil {
		t.Fatal(err)
	}
	w.Close() // the holder keeps its own descriptor

	// A new client (a restarted daemon) gets it back and can use it.
	cl2 := dial(t, path)
	f, state, err := cl2.Take("/mnt/a")
	if err != nil || f == nil || string(state) != "state-a" {
		t.Fatalf("take: %v, %v, %q", f, err, state)
	}
	if _, err := f.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	f.Close()
	buf := make([]byte, 5)
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("read through the handed-back descriptor: %q, %v", buf, err)
	}
	if mps, err := cl2.List(); err != nil || len(mps) != 1 || mps[0] != "/mnt/a" {
		t.Errorf("list = %v, %v", mps, err)
	}
	if f, _, err := cl2.Take("/mnt/none"); err != nil || f != nil {
		t.Errorf("take of nothing = %v, %v; want nil, nil", f, err)
	}
	if err := cl2.Drop("/mnt/a"); err != nil {
		t.Fatal(err)
	}
	// Dropped: the pipe's last writer is gone, so the reader sees EOF.
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := r.Read(buf); err != io.EOF {
		t.Errorf("after drop: read %d, %v; want EOF", n, err)
	}
	if f, _, err := cl2.Take("/mnt/a"); err != nil || f != nil {
		t.Errorf("take after drop = %v, %v", f, err)
	}
}

func TestRejectsOtherVersions(t *testing.T) {
	path, _ := startHolder(t, ServeOptions{})
	c, err := net.Dial("unixpacket", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tests := []struct {
		req  Request
		want string
	}{
		{Request{Version: 2, Op: OpList}, "unsupported protocol version 2: this holder speaks version 1"},
		{Request{Version: 0, Op: OpList}, "unsupported protocol version 0"},
		{Request{Version: Version, Op: "steal"}, `unknown operation "steal"`},
		{Request{Version: Version, Op: OpPut, Mountpoint: "/x"}, "exactly one descriptor"},
	}
	for _, tt := range tests {
		b, _ := json.Marshal(tt.req)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, maxMessage)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		var resp Response
		if err := json.Unmarshal(buf[:n], &resp); err != nil {
			t.Fatal(err)
		}
		if resp.Version != Version || !strings.Contains(resp.Error, tt.want) {
			t.Errorf("%+v: response %+v, want error containing %q", tt.req, resp, tt.want)
		}
	}
}

func TestPrunesDeadDescriptorsAndExitsIdle(t *testing.T) {
	path, done := startHolder(t, ServeOptions{PruneInterval: 20 * time.Millisecond, IdleExit: 300 * time.Millisecond})
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cl := dial(t, path)
	if err := cl.Put("/mnt/a", r, nil); err != nil {
		t.Fatal(err)
	}
	r.Close()
	w.Close() // the held read end now reports POLLHUP: its "mount" is gone
	deadline := time.Now().Add(5 * time.Second)
	for {
		mps, err := cl.List()
		if err != nil {
			t.Fatal(err)
		}
		if len(mps) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("dead descriptor still held: %v", mps)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// A connected client keeps it alive; once it goes, the holder exits.
	time.Sleep(500 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("holder exited with a client connected: %v", err)
	default:
	}
	cl.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("idle exit: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("idle holder did not exit")
	}
}

func TestListenRefusesSecondHolder(t *testing.T) {
	path, _ := startHolder(t, ServeOptions{})
	if l, err := Listen(path); err == nil {
		l.Close()
		t.Fatal("second holder could listen on a live holder's socket")
	}
}
