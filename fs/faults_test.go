package fs_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/cache"
	"github.com/streamer-dev/streamer/fetcher"
	stfs "github.com/streamer-dev/streamer/fs"
	"github.com/streamer-dev/streamer/internal/testenv"
)

// Timeouts of the fault suite: short, so that every failure case proves
// "EIO within the configured timeout" in a few seconds.
const (
	faultFetchTimeout = 3 * time.Second // fetcher.Options.Timeout: one ReadRange, retries included
	faultReadTimeout  = 4 * time.Second // ManagerOptions.ReadTimeout: one FUSE read
	// faultSlack is what a failing read may take beyond its timeout
	// (FUSE round trips, scheduling).
	faultSlack = 2 * time.Second
)

// logBuffer collects log lines for assertions; safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// faultEnv is a registry behind a fault proxy, with one streamed image
// pushed through it.
type faultEnv struct {
	reg    *testenv.Reg
	proxy  *testenv.FaultProxy
	client *fetcher.Client
	img    streamedImage
	files  map[string][]byte
}

// newFaultEnv starts a registry (with opts) behind a fault proxy and pushes
// a streamed image of a few files through it. creds are the client's.
func newFaultEnv(t *testing.T, opts testenv.RegistryOptions, creds fetcher.Credential) *faultEnv {
	t.Helper()
	requireFUSE(t)
	r := testenv.Registry(t, opts)
	proxy := testenv.NewFaultProxy(t, r.Host)
	client, err := fetcher.New(fetcher.Options{
		Retries:      3,
		Timeout:      faultFetchTimeout,
		Username:     creds.Username,
		Password:     creds.Password,
		DockerConfig: filepath.Join(t.TempDir(), "config.json"),
	})
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		"small.txt": []byte("hello from a layer under fire\n"),
		"one.bin":   randomBytes(31, 40<<10),  // one chunk
		"data.bin":  randomBytes(32, 256<<10), // four chunks
	}
	entries := []tarEntry{dir("app/", 0o755, 1)}
	for _, name := range []string{"small.txt", "one.bin", "data.bin"} {
		entries = append(entries, reg("app/"+name, 0o644, files[name], 2))
	}
	img := pushStreamedImage(t, client, proxy.Host, "test/faults", makeTar(t, entries), true)
	return &faultEnv{reg: r, proxy: proxy, client: client, img: img, files: files}
}

// node is one daemon's Manager and cache over a root, as a (re)start makes.
type node struct {
	root  string
	m     *stfs.Manager
	cache *cache.Store
	logs  *logBuffer
}

func (n *node) cacheDir() string { return filepath.Join(n.root, "cache") }

// startNode opens the cache and a Manager on root; close stops both (also
// in t.Cleanup, idempotently).
func startNode(t *testing.T, client *fetcher.Client, root string, mods ...func(*stfs.ManagerOptions)) (*node, func()) {
	t.Helper()
	logs := &logBuffer{}
	l := logrus.New()
	l.SetLevel(logrus.DebugLevel)
	l.SetOutput(logs)
	n := &node{root: root, logs: logs}
	st, err := cache.Open(cache.Options{Dir: n.cacheDir(), MaxBytes: 1 << 30, MemoryBytes: -1})
	if err != nil {
		t.Fatal(err)
	}
	opts := stfs.ManagerOptions{
		Root:        filepath.Join(root, "layers"),
		Registry:    client,
		Cache:       st,
		ReadTimeout: faultReadTimeout,
		Logger:      logrus.NewEntry(l),
	}
	for _, mod := range mods {
		mod(&opts)
	}
	m, err := stfs.NewManager(opts)
	if err != nil {
		st.Close()
		t.Fatal(err)
	}
	n.m, n.cache = m, st
	var once sync.Once
	stop := func() {
		once.Do(func() {
			if err := m.Close(); err != nil {
				t.Errorf("close manager: %v", err)
			}
			st.Close()
		})
	}
	t.Cleanup(stop)
	return n, stop
}

// chunkFiles lists the chunk files of the cache in dir (a chunk each).
func chunkFiles(dir string) []string {
	var chunks []string
	filepath.WalkDir(filepath.Join(dir, "sha256"), func(p string, de fs.DirEntry, err error) error {
		if err == nil && !de.IsDir() {
			chunks = append(chunks, p)
		}
		return nil
	})
	return chunks
}

// cacheFiles lists the files of the cache in dir that hold chunks: chunk
// files and packs (the small chunks of a fetched run, together).
func cacheFiles(dir string) []string {
	files := chunkFiles(dir)
	packs, _ := filepath.Glob(filepath.Join(dir, "packs", "*"))
	return append(files, packs...)
}

// assertCacheSound checks that every chunk the cache in dir holds, in a
// file of its own or in a pack, has the bytes of its digest, and returns
// how many there are.
func assertCacheSound(t *testing.T, dir string) int {
	t.Helper()
	n, bad, err := cache.Verify(dir)
	if err != nil {
		t.Errorf("verify cache %s: %v", dir, err)
	}
	for _, err := range bad {
		t.Errorf("cache holds a wrong chunk: %v", err)
	}
	return n
}

// timedRead reads p in a child process (busybox cat), as a container
// would, and reports how long it took; an I/O error of the child is
// returned as syscall.EIO. Reading in a child also keeps this process, the
// FUSE server, out of the kernel's FUSE paths. A read that has not returned
// after bound is a hang: the test aborts the FUSE connection of the mount
// holding p, dumps this process's goroutines and fails.
func timedRead(t *testing.T, p string, bound time.Duration) ([]byte, error, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "/bin/busybox", "cat", p)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 2 * time.Second
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	if ctx.Err() != nil {
		var dump bytes.Buffer
		pprof.Lookup("goroutine").WriteTo(&dump, 1)
		t.Logf("goroutines after the read of %s hung:\n%s", p, dump.String())
		abortFUSE(t, p)
		t.Fatalf("read %s HUNG: no answer after %v", p, bound)
	}
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "I/O error") || strings.Contains(msg, "Input/output error") {
			return stdout.Bytes(), fmt.Errorf("cat %s: %s: %w", p, msg, syscall.EIO), took
		}
		return stdout.Bytes(), fmt.Errorf("cat %s: %v: %s", p, err, msg), took
	}
	return stdout.Bytes(), nil, took
}

// readChild is timedRead without the duration.
func readChild(t *testing.T, p string, bound time.Duration) ([]byte, error) {
	t.Helper()
	b, err, _ := timedRead(t, p, bound)
	return b, err
}

// abortFUSE aborts the FUSE connection of the mount that holds path (via
// fusectl), failing every pending and future request of it with ENOTCONN.
func abortFUSE(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Logf("abort FUSE: %v", err)
		return
	}
	minor, best := "", ""
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(path, f[4]+"/") && len(f[4]) > len(best) && strings.Contains(line, " - fuse") {
			if _, m, ok := strings.Cut(f[2], ":"); ok {
				minor, best = m, f[4]
			}
		}
	}
	if minor == "" {
		t.Logf("abort FUSE: no FUSE mount holds %s", path)
		return
	}
	const ctl = "/sys/fs/fuse/connections"
	if _, err := os.Stat(filepath.Join(ctl, minor)); err != nil {
		_ = syscall.Mount("fusectl", ctl, "fusectl", 0, "")
	}
	if err := os.WriteFile(filepath.Join(ctl, minor, "abort"), []byte("1"), 0o200); err != nil {
		t.Logf("abort FUSE connection %s: %v", minor, err)
	}
}

// TestFaultsNetwork injects each registry fault between a mounted layer and
// its registry, and checks what a reading process sees: the right bytes
// (after retries), or EIO within the configured timeout, never a hang or a
// wrong byte; that the failure is logged; and that the cache holds only
// chunks that verify.
func TestFaultsNetwork(t *testing.T) {
	e := newFaultEnv(t, testenv.RegistryOptions{}, fetcher.Credential{})
	type want int
	const (
		wantData want = iota // the right bytes
		wantEIO              // EIO within the timeout, then the right bytes once the fault is gone
	)
	for _, tc := range []struct {
		name string
		spec testenv.FaultSpec
		file string
		want want
		// minTook: the read must have waited at least this long
		// (Retry-After honoured).
		minTook time.Duration
		log     string // a log line a person would grep for
	}{
		{name: "reset mid-body then ok", spec: testenv.FaultSpec{Fault: testenv.FaultResetMidBody, Count: 2}, file: "data.bin", want: wantData},
		{name: "reset mid-body forever", spec: testenv.FaultSpec{Fault: testenv.FaultResetMidBody}, file: "data.bin", want: wantEIO, log: "read failed"},
		{name: "stall without a byte", spec: testenv.FaultSpec{Fault: testenv.FaultStall}, file: "one.bin", want: wantEIO, log: "read failed"},
		{name: "slow trickle", spec: testenv.FaultSpec{Fault: testenv.FaultTrickle, Rate: 512 << 10}, file: "data.bin", want: wantData},
		{name: "500 burst then ok", spec: testenv.FaultSpec{Fault: testenv.FaultStatus, Status: 500, Count: 2}, file: "data.bin", want: wantData},
		{name: "502 burst then ok", spec: testenv.FaultSpec{Fault: testenv.FaultStatus, Status: 502, Count: 2}, file: "data.bin", want: wantData},
		{name: "503 burst then ok", spec: testenv.FaultSpec{Fault: testenv.FaultStatus, Status: 503, Count: 2}, file: "data.bin", want: wantData},
		{name: "503 forever", spec: testenv.FaultSpec{Fault: testenv.FaultStatus, Status: 503}, file: "one.bin", want: wantEIO, log: "503"},
		{name: "429 with Retry-After", spec: testenv.FaultSpec{Fault: testenv.FaultRetryAfter, RetryAfter: time.Second, Count: 1}, file: "one.bin", want: wantData, minTook: 900 * time.Millisecond},
		{name: "200 with the whole blob", spec: testenv.FaultSpec{Fault: testenv.FaultWhole200}, file: "data.bin", want: wantData},
		{name: "wrong Content-Range", spec: testenv.FaultSpec{Fault: testenv.FaultWrongContentRange, Shift: 7}, file: "one.bin", want: wantEIO, log: "range response mismatch"},
		{name: "short body", spec: testenv.FaultSpec{Fault: testenv.FaultShortBody}, file: "one.bin", want: wantEIO, log: "read failed"},
		{name: "short body once", spec: testenv.FaultSpec{Fault: testenv.FaultShortBody, Count: 1}, file: "one.bin", want: wantData},
		{name: "redirect loop", spec: testenv.FaultSpec{Fault: testenv.FaultRedirectLoop}, file: "one.bin", want: wantEIO, log: "redirects"},
		{name: "blob changed under its digest", spec: testenv.FaultSpec{Fault: testenv.FaultChangedBlob}, file: "data.bin", want: wantEIO, log: "chunk failed verification"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.proxy.Clear()
			n, _ := startNode(t, e.client, t.TempDir())
			dir := managerMount(t, n.m, e.img.labels())
			path := filepath.Join(dir, "app", tc.file)
			want := e.files[tc.file]

			before := e.proxy.Faulted()
			e.proxy.Set(tc.spec)
			got, err, took := timedRead(t, path, faultReadTimeout+faultSlack+5*time.Second)
			faulted := e.proxy.Faulted() - before
			e.proxy.Clear()
			if faulted == 0 {
				t.Fatalf("the fault was never applied (%d blob GETs)", e.proxy.BlobGets())
			}
			switch tc.want {
			case wantData:
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("read %s under %s: %v (equal %v); want the file's bytes after retries\nlogs:\n%s", tc.file, tc.spec.Fault, err, bytes.Equal(got, want), n.logs)
				}
				if took < tc.minTook {
					t.Errorf("read took %v; want at least %v (Retry-After honoured)", took, tc.minTook)
				}
			case wantEIO:
				if !errors.Is(err, syscall.EIO) {
					t.Fatalf("read %s under %s: err = %v (%d bytes); want EIO", tc.file, tc.spec.Fault, err, len(got))
				}
				// The kernel sends a failed page-cache read to the server
				// again (readahead, then the page itself, then once more);
				// the layer remembers the failure for the reading process,
				// so the reader sees EIO within one read timeout, not three.
				if took > faultReadTimeout+faultSlack {
					t.Errorf("EIO after %v; the read timeout is %v", took, faultReadTimeout)
				}
				// The fault is gone: the same file reads right, at once.
				got, err, _ = timedRead(t, path, faultReadTimeout+faultSlack)
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("read %s after the fault: %v (equal %v)", tc.file, err, bytes.Equal(got, want))
				}
			}
			if tc.log != "" && !strings.Contains(n.logs.String(), tc.log) {
				t.Errorf("logs do not say %q:\n%s", tc.log, n.logs)
			}
			if c := assertCacheSound(t, n.cacheDir()); c == 0 {
				t.Errorf("nothing cached after a successful read")
			}
			t.Logf("%s: %d blob GETs faulted, read took %v", tc.spec.Fault, faulted, took.Round(time.Millisecond))
		})
	}

	t.Run("connection refused", func(t *testing.T) {
		e.proxy.Clear()
		n, _ := startNode(t, e.client, t.TempDir())
		dir := managerMount(t, n.m, e.img.labels())
		path := filepath.Join(dir, "app", "one.bin")
		e.proxy.SetRefused(true)
		_, err, took := timedRead(t, path, faultReadTimeout+faultSlack+5*time.Second)
		e.proxy.SetRefused(false)
		if !errors.Is(err, syscall.EIO) || took > faultReadTimeout+faultSlack {
			t.Fatalf("read with the registry refusing connections: %v after %v; want EIO within %v", err, took, faultReadTimeout)
		}
		if !strings.Contains(n.logs.String(), "connection refused") {
			t.Errorf("logs do not say connection refused:\n%s", n.logs)
		}
		got, err, _ := timedRead(t, path, faultReadTimeout+faultSlack)
		if err != nil || !bytes.Equal(got, e.files["one.bin"]) {
			t.Errorf("read once the registry listens again: %v", err)
		}
		assertCacheSound(t, n.cacheDir())
	})
}

// TestFaultsTokenExpiry: the registry's bearer token expires mid-stream;
// the client gets 401, fetches a new token with its credentials and goes on.
func TestFaultsTokenExpiry(t *testing.T) {
	const user, pass = "puller", "token-expiry-secret"
	e := newFaultEnv(t, testenv.RegistryOptions{Token: true, Htpasswd: map[string]string{user: pass}}, fetcher.Credential{Username: user, Password: pass})
	n, _ := startNode(t, e.client, t.TempDir())
	dir := managerMount(t, n.m, e.img.labels())
	got, err := readChild(t, filepath.Join(dir, "app", "small.txt"), faultReadTimeout+faultSlack)
	if err != nil || !bytes.Equal(got, e.files["small.txt"]) {
		t.Fatalf("read before expiry: %v", err)
	}
	tokens, before := e.reg.TokenRequests(), e.proxy.Faulted()
	e.proxy.Set(testenv.FaultSpec{Fault: testenv.FaultExpireTokens})
	t.Cleanup(e.proxy.Clear)
	got, err = readChild(t, filepath.Join(dir, "app", "data.bin"), faultReadTimeout+faultSlack)
	if err != nil || !bytes.Equal(got, e.files["data.bin"]) {
		t.Fatalf("read after the token expired: %v (equal %v)\nlogs:\n%s", err, bytes.Equal(got, e.files["data.bin"]), n.logs)
	}
	if e.proxy.Faulted() == before {
		t.Fatal("no request was refused with an expired token")
	}
	if e.reg.TokenRequests() <= tokens {
		t.Errorf("no new token fetched after expiry (%d token requests before, %d after)", tokens, e.reg.TokenRequests())
	}
	if strings.Contains(n.logs.String(), pass) {
		t.Errorf("the password appears in the logs")
	}
	assertCacheSound(t, n.cacheDir())
}

// TestFaultsCacheOnDisk: cached chunk files damaged on disk while the
// daemon is down (a bit flipped, a file truncated) are detected by their
// digest when read after the restart, dropped and fetched again: the
// reader gets the right bytes.
func TestFaultsCacheOnDisk(t *testing.T) {
	e := newFaultEnv(t, testenv.RegistryOptions{}, fetcher.Credential{})
	root := t.TempDir()
	n, stop := startNode(t, e.client, root)
	dir := managerMount(t, n.m, e.img.labels())
	want := e.files["data.bin"]
	if got, err := readChild(t, filepath.Join(dir, "app", "data.bin"), 10*time.Second); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("first read: %v", err)
	}
	stop()

	before := assertCacheSound(t, n.cacheDir())
	chunks := cacheFiles(n.cacheDir())
	if len(chunks) < 2 {
		t.Fatalf("%d cache files (chunks and packs); want at least 2", len(chunks))
	}
	// One bit flipped in the middle of one chunk, another cut in half:
	// sizes alone would not catch the first, nor a length check the second.
	b, err := os.ReadFile(chunks[0])
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x10
	if err := os.WriteFile(chunks[0], b, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Logf("bit flipped in %s, cut in half: %s", chunks[0], chunks[1])
	info, _ := os.Stat(chunks[1])
	if err := os.Truncate(chunks[1], info.Size()/2); err != nil {
		t.Fatal(err)
	}

	n2, _ := startNode(t, e.client, root)
	dir2 := managerMount(t, n2.m, e.img.labels())
	gets := e.proxy.BlobGets()
	for _, f := range []string{"data.bin", "one.bin", "small.txt"} {
		if got, err := readChild(t, filepath.Join(dir2, "app", f), 10*time.Second); err != nil || !bytes.Equal(got, e.files[f]) {
			t.Fatalf("read %s after the cache was damaged: %v (equal %v)", f, err, bytes.Equal(got, e.files[f]))
		}
	}
	if s := n2.cache.Stats(); s.Corrupted < 1 {
		t.Errorf("cache stats %+v: want the flipped chunk counted as corrupted", s)
	}
	if e.proxy.BlobGets() == gets {
		t.Errorf("no chunk fetched again after the cache was damaged")
	}
	// Every chunk cached before is cached again, and nothing damaged is
	// left: a damaged pack goes whole, its chunks fetched again.
	if after := assertCacheSound(t, n2.cacheDir()); after < before {
		t.Errorf("%d chunks cached after the reads; %d before the damage", after, before)
	}
}

// TestFaultsDiskFull: the cache's disk fills up while chunks are being
// cached (a 1 MiB tmpfs). Reads still return the right bytes, from the
// network; the log says the disk is full; no partial chunk is left.
func TestFaultsDiskFull(t *testing.T) {
	requireFUSE(t)
	e := newFaultEnv(t, testenv.RegistryOptions{}, fetcher.Credential{})
	big := randomBytes(41, 3<<20) // incompressible, three times the disk
	img := pushStreamedImage(t, e.client, e.proxy.Host, "test/diskfull", makeTar(t, []tarEntry{reg("big.bin", 0o644, big, 1)}), true)

	root := t.TempDir()
	cacheDir := filepath.Join(root, "cache")
	if err := os.MkdirAll(cacheDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", cacheDir, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("SKIP LOUDLY: cannot mount a small tmpfs for the cache: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(cacheDir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount tmpfs %s: %v", cacheDir, err)
		}
	})
	// The cache package logs through the standard logger.
	std := &logBuffer{}
	logrus.StandardLogger().SetOutput(std)
	t.Cleanup(func() { logrus.StandardLogger().SetOutput(os.Stderr) })

	n, _ := startNode(t, e.client, root)
	dir := managerMount(t, n.m, img.labels())
	for i := 0; i < 2; i++ { // the second read finds no more on disk than fits
		got, err := readChild(t, filepath.Join(dir, "big.bin"), 20*time.Second)
		if err != nil || !bytes.Equal(got, big) {
			t.Fatalf("read %d with the cache disk full: %v (equal %v)", i, err, bytes.Equal(got, big))
		}
	}
	logs := std.String() + n.logs.String()
	if !strings.Contains(logs, "no space left on device") {
		t.Errorf("logs do not say the disk is full:\n%s", logs)
	}
	if !strings.Contains(logs, "cache disk full") && !strings.Contains(logs, "cache chunk") {
		t.Errorf("no log line a person would grep for (\"cache disk full\"):\n%s", logs)
	}
	if c := assertCacheSound(t, cacheDir); c == 0 {
		t.Errorf("nothing cached at all on a 1 MiB disk")
	}
	if left, _ := os.ReadDir(filepath.Join(cacheDir, "tmp")); len(left) != 0 {
		t.Errorf("%d partial chunk files left in the cache's tmp dir", len(left))
	}
}
