package cache

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
)

// openPackFiles lists the pack files this process holds open, and how many
// of them are removed files.
func openPackFiles(tb testing.TB, dir string) (open, removed int) {
	tb.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatalf("list descriptors: %v", err)
	}
	prefix := filepath.Join(dir, packDir) + "/"
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name()))
		if err != nil || !strings.HasPrefix(target, prefix) {
			continue
		}
		open++
		if strings.HasSuffix(target, " (deleted)") {
			removed++
		}
	}
	return open, removed
}

// TestOpenPacks: reading chunks from packs keeps the files of the packs
// read last open, at most openPacksMax of them; a pack evicted from the
// cache has its file closed (an open descriptor would keep its blocks),
// and Close closes them all. Reads racing with evictions get the right
// bytes or a miss, never other bytes.
func TestOpenPacks(t *testing.T) {
	const packs, per, size = openPacksMax + 16, 8, 1000
	dir := t.TempDir()
	s := openStore(t, Options{Dir: dir, MemoryBytes: -1})
	var ds [][]digest.Digest
	var bs [][][]byte
	for p := range packs {
		pd, pb := make([]digest.Digest, per), make([][]byte, per)
		for i := range per {
			pb[i], pd[i] = chunk(fmt.Sprint("pack", p, "-", i), size)
		}
		if err := s.PutVerifiedRun(pd, pb, true); err != nil {
			t.Fatal(err)
		}
		ds, bs = append(ds, pd), append(bs, pb)
	}
	if n := len(packFiles(t, dir)); n != packs {
		t.Fatalf("%d pack files, want %d", n, packs)
	}
	if open, _ := openPackFiles(t, dir); open != 0 {
		t.Fatalf("%d pack files open before any read", open)
	}
	for p := range packs {
		for i := range per {
			got, ok := s.Get(ds[p][i])
			if !ok || !bytes.Equal(got, bs[p][i]) {
				t.Fatalf("chunk %d of pack %d: ok=%v, wrong bytes", i, p, ok)
			}
		}
	}
	if open, _ := openPackFiles(t, dir); open != openPacksMax {
		t.Fatalf("after reading %d packs: %d pack files open, want %d", packs, open, openPacksMax)
	}

	// A store bounded to a few packs' bytes evicts the rest whole.
	small := t.TempDir()
	s2 := openStore(t, Options{Dir: small, MemoryBytes: -1, MaxBytes: 4 * per * size})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var wrong, hits int
	var mu sync.Mutex
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				for p := range packs {
					for i := range per {
						got, ok := s2.Get(ds[p][i])
						mu.Lock()
						if ok {
							hits++
							if !bytes.Equal(got, bs[p][i]) {
								wrong++
							}
						}
						mu.Unlock()
					}
				}
			}
		})
	}
	for p := range packs {
		if err := s2.PutVerifiedRun(ds[p], bs[p], true); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	if wrong > 0 {
		t.Fatalf("%d of %d reads racing with evictions got other bytes", wrong, hits)
	}
	if n := len(packFiles(t, small)); n > 4 {
		t.Fatalf("bounded store kept %d packs, want at most 4", n)
	}
	if _, removed := openPackFiles(t, small); removed != 0 {
		t.Fatalf("%d evicted pack files still open", removed)
	}
	if corrupted := s2.corrupted.Load(); corrupted != 0 {
		t.Fatalf("%d reads racing with evictions found a damaged pack", corrupted)
	}

	s.Close()
	s2.Close()
	if open, _ := openPackFiles(t, dir); open != 0 {
		t.Fatalf("after Close: %d pack files open", open)
	}
}
