package fs

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestConnWritesNothingAfterClose: once a conn is closed, its descriptor
// number may be another file's; a late reply or page-cache push must fail
// rather than land there.
func TestConnWritesNothingAfterClose(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[0])
	c := &conn{dev: p[1]}
	c.close()
	// The lowest free descriptor is the one just closed: the next pipe's
	// write end (or read end) takes it.
	var q [2]int
	if err := unix.Pipe2(q[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(q[0])
	defer unix.Close(q[1])
	if q[0] != p[1] && q[1] != p[1] {
		t.Logf("descriptor %d not reused (new pipe %v); checking the refusal alone", p[1], q)
	}
	if err := c.write([]byte("reply")); !errors.Is(err, os.ErrClosed) {
		t.Errorf("write after close: %v, want os.ErrClosed", err)
	}
	if err := c.notifyStore(2, 0, []byte("page")); !errors.Is(err, os.ErrClosed) {
		t.Errorf("notifyStore after close: %v, want os.ErrClosed", err)
	}
	buf := make([]byte, 64)
	if n, _ := unix.Read(q[0], buf); n > 0 {
		t.Errorf("the reused descriptor got %q", buf[:n])
	}
}
