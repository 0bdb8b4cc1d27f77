package fs_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fs"
	"github.com/streamer-dev/streamer/internal/fdholder"
)

// Environment of the helper process that serves a layer for
// TestMountSurvivesServerKill.
const (
	envChild = "STREAMER_FS_TEST_RESTART_CHILD" // holder socket,mountpoint,toc file,blob file
	envSlow  = "STREAMER_FS_TEST_RESTART_SLOW"  // tar offset from which reads never finish
)

// TestRestartChildServer is not a test: it is the server process of
// TestMountSurvivesServerKill, run only when re-executed with envChild.
func TestRestartChildServer(t *testing.T) {
	spec := os.Getenv(envChild)
	if spec == "" {
		t.Skip("helper process of TestMountSurvivesServerKill; runs only when re-executed by it")
	}
	p := strings.Split(spec, ",")
	cl, err := fdholder.Dial(p[0])
	if err != nil {
		t.Fatal(err)
	}
	fs.SetDefaultHolder(cl)
	tb, err := os.ReadFile(p[2])
	if err != nil {
		t.Fatal(err)
	}
	toc, err := artifact.DecodeTOC(bytes.NewReader(tb), artifact.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	blob, err := os.ReadFile(p[3])
	if err != nil {
		t.Fatal(err)
	}
	var r fs.ChunkReader = &memReader{blob: blob}
	if s := os.Getenv(envSlow); s != "" {
		var from int64
		fmt.Sscan(s, &from)
		r = &stallingReader{memReader: memReader{blob: blob}, from: from}
	}
	if _, err := fs.Mount(p[1], toc, r, fs.Options{Logger: quietLogger()}); err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	time.Sleep(time.Minute) // until killed
}

// stallingReader never returns chunks at or after tar offset from.
type stallingReader struct {
	memReader
	from int64
}

func (r *stallingReader) ReadChunk(ctx context.Context, c artifact.Chunk) ([]byte, error) {
	if c.Offset+c.Size > r.from {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return r.memReader.ReadChunk(ctx, c)
}

// startChild starts a server process of the layer and waits until it
// serves. It is killed at cleanup if still running.
func startChild(t *testing.T, spec, slow string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestRestartChildServer$", "-test.count=1")
	cmd.Env = append(os.Environ(), envChild+"="+spec, envSlow+"="+slow)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	ready := make(chan error, 1)
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			if s.Text() == "ready" {
				ready <- nil
				io.Copy(io.Discard, out)
				return
			}
		}
		ready <- fmt.Errorf("server process ended before serving: %v", s.Err())
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("server process not ready within 30s")
	}
	return cmd
}

func mountDevice(t *testing.T, mp string) []string {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(mp))
	if err != nil {
		t.Fatal(err)
	}
	var devs []string
	for _, m := range ms {
		devs = append(devs, fmt.Sprintf("%d:%d", m.Major, m.Minor))
	}
	return devs
}

// TestMountSurvivesServerKill kills the process serving a mount with
// SIGKILL and starts another: the mount stays, an open file keeps reading
// through the same descriptor, new opens work, and a read that was in
// flight at the kill is answered by the new process.
func TestMountSurvivesServerKill(t *testing.T) {
	requireFUSE(t)
	rng := rand.New(rand.NewSource(9))
	big := make([]byte, 700<<10) // many chunks
	rng.Read(big)
	slow := make([]byte, 200<<10)
	rng.Read(slow)
	entries := []tarEntry{
		{hdr: tar.Header{Name: "data/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{hdr: tar.Header{Name: "data/big", Typeflag: tar.TypeReg, Mode: 0o644}, data: big},
		{hdr: tar.Header{Name: "data/small", Typeflag: tar.TypeReg, Mode: 0o644}, data: []byte("small file\n")},
		{hdr: tar.Header{Name: "data/link", Typeflag: tar.TypeSymlink, Linkname: "small"}},
		{hdr: tar.Header{Name: "data/z-slow", Typeflag: tar.TypeReg, Mode: 0o644}, data: slow},
	}
	l := buildLayer(t, makeTar(t, entries), testChunkSize)
	var slowOff int64 = -1
	for _, e := range l.toc.Entries {
		if e.Name == "data/z-slow" {
			slowOff = e.Offset
		}
	}
	if slowOff < 0 {
		t.Fatal("no data/z-slow in the TOC")
	}

	dir := t.TempDir()
	tocPath, blobPath := filepath.Join(dir, "toc"), filepath.Join(dir, "blob")
	var tb bytes.Buffer
	if err := artifact.EncodeTOC(&tb, l.toc); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tocPath, tb.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(blobPath, l.blob, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "h.sock")
	hl, err := fdholder.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	hctx, stopHolder := context.WithCancel(context.Background())
	holderDone := make(chan struct{})
	go func() { fdholder.Serve(hctx, hl, fdholder.ServeOptions{Logger: quietLogger()}); close(holderDone) }()
	mp := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	// Cleanup runs in reverse: children are killed first (their own
	// cleanups), then the mount goes and the holder stops.
	t.Cleanup(func() {
		unix.Unmount(mp, unix.MNT_DETACH)
		stopHolder()
		<-holderDone
	})
	spec := strings.Join([]string{sock, mp, tocPath, blobPath}, ",")

	first := startChild(t, spec, fmt.Sprint(slowOff))
	devBefore := mountDevice(t, mp)

	// A process keeps data/big open across the restart: it reads the
	// head, waits for the go file, then reads the rest through the same
	// descriptor. Open files of this test process would get in the way:
	// the exec of the next server closes them, and the FLUSH of a file
	// on a mount nobody serves would wait for that very server.
	headLen := 100 << 10
	goFile := filepath.Join(dir, "go")
	holderSh := exec.Command("/bin/busybox", "sh", "-c", `exec 3< "$1"
dd bs=$2 count=1 <&3 > "$3/head" 2>/dev/null || exit 1
echo read-head
while [ ! -e "$4" ]; do sleep 0.05; done
cat <&3 > "$3/rest"`, "sh", filepath.Join(mp, "data/big"), fmt.Sprint(headLen), dir, goFile)
	shOut, err := holderSh.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holderSh.Start(); err != nil {
		t.Skipf("SKIP LOUDLY: need /bin/busybox for the reader processes: %v", err)
	}
	t.Cleanup(func() { holderSh.Process.Kill(); holderSh.Wait() })
	line := make([]byte, 10)
	if _, err := io.ReadFull(shOut, line); err != nil || string(line) != "read-head\n" {
		t.Fatalf("reader process did not read the head: %q, %v", line, err)
	}
	if head, err := os.ReadFile(filepath.Join(dir, "head")); err != nil || !bytes.Equal(head, big[:headLen]) {
		t.Fatalf("read before the kill: %d bytes, %v", len(head), err)
	}

	// A read the first server can never answer: in flight at the kill.
	// Another process reads, as a container would: a thread of this
	// process stuck in a FUSE read would block its own fork/exec of the
	// next server (the vfork child waits on this process's memory map).
	type result struct {
		data []byte
		err  error
	}
	inflight := make(chan result, 1)
	cat := exec.Command("/bin/busybox", "cat", filepath.Join(mp, "data/z-slow"))
	var catOut bytes.Buffer
	cat.Stdout = &catOut
	if err := cat.Start(); err != nil {
		t.Skipf("SKIP LOUDLY: need /bin/busybox to read from another process: %v", err)
	}
	t.Cleanup(func() { cat.Process.Kill() })
	go func() {
		err := cat.Wait()
		inflight <- result{catOut.Bytes(), err}
	}()
	time.Sleep(300 * time.Millisecond)
	select {
	case r := <-inflight:
		t.Fatalf("read of the stalled file returned before the kill: %v", r.err)
	default:
	}

	killedAt := time.Now()
	if err := first.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	first.Wait()
	startChild(t, spec, "")
	t.Logf("mount unanswered for %v (kill to new server ready)", time.Since(killedAt))

	if got := mountDevice(t, mp); fmt.Sprint(got) != fmt.Sprint(devBefore) {
		t.Errorf("mounts at %s: %v after restart, want the same single mount %v", mp, got, devBefore)
	}
	select {
	case r := <-inflight:
		if r.err != nil {
			t.Errorf("read in flight at the kill: %v (got %d bytes)", r.err, len(r.data))
		} else if !bytes.Equal(r.data, slow) {
			t.Errorf("read in flight at the kill: %d wrong bytes", len(r.data))
		}
	case <-time.After(20 * time.Second):
		t.Fatal("read in flight at the kill never returned")
	}
	if err := os.WriteFile(goFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	shDone := make(chan error, 1)
	go func() { shDone <- holderSh.Wait() }()
	select {
	case err := <-shDone:
		rest, rerr := os.ReadFile(filepath.Join(dir, "rest"))
		if err != nil || rerr != nil || !bytes.Equal(rest, big[headLen:]) {
			t.Errorf("same descriptor after restart: %d bytes (%v, %v); want the rest of the file", len(rest), err, rerr)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("reader of the open descriptor did not finish after the restart")
	}
	for name, want := range map[string][]byte{"data/small": []byte("small file\n"), "data/big": big} {
		got, err := os.ReadFile(filepath.Join(mp, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("new open of %s after restart: %d bytes, %v", name, len(got), err)
		}
	}
	if target, err := os.Readlink(filepath.Join(mp, "data/link")); err != nil || target != "small" {
		t.Errorf("readlink after restart: %q, %v", target, err)
	}
	names, err := os.ReadDir(filepath.Join(mp, "data"))
	if err != nil || len(names) != 4 {
		t.Errorf("readdir after restart: %v, %v", names, err)
	}
}
