package testenv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// BlobStorage stands for the object storage or CDN most registries send
// blob reads to: docker-registry's redirect middleware answers every blob
// GET and HEAD with a 307 to BaseURL plus the blob's path in its storage,
// and BlobStorage serves that path from the registry's storage directory
// (GET and HEAD, with ranges, by sendfile). It counts what it serves.
type BlobStorage struct {
	// BaseURL is "http://HOST:PORT", the redirect middleware's baseurl.
	BaseURL string
	root    string
	srv     *http.Server
	done    chan struct{}

	requests, ranges atomic.Int64
}

// NewBlobStorage serves root on l until Close.
func NewBlobStorage(l net.Listener, root string) *BlobStorage {
	s := &BlobStorage{BaseURL: "http://" + l.Addr().String(), root: root, done: make(chan struct{})}
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(s.done)
		_ = s.srv.Serve(l)
	}()
	return s
}

// StartBlobStorage serves root on a free loopback port; it is closed on
// cleanup.
func StartBlobStorage(t testing.TB, root string) *BlobStorage {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("blob storage: %v", err)
	}
	s := NewBlobStorage(l, root)
	t.Cleanup(s.Close)
	return s
}

// ServeBlobStorage serves root on addr until ctx ends.
func ServeBlobStorage(ctx context.Context, addr, root string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("blob storage listen on %s: %w", addr, err)
	}
	s := NewBlobStorage(l, root)
	<-ctx.Done()
	s.Close()
	return nil
}

// Close stops serving and waits for the server to end.
func (s *BlobStorage) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
	<-s.done
}

// Requests is how many blob requests were served, Ranges how many of them
// asked for a range.
func (s *BlobStorage) Requests() (all, ranges int64) {
	return s.requests.Load(), s.ranges.Load()
}

func (s *BlobStorage) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	// Blobs only: .../blobs/<alg>/<2 hex>/<hex>/data under the root.
	rel := filepath.Clean("/" + r.URL.Path)
	if !strings.Contains(rel, "/blobs/") || filepath.Base(rel) != "data" {
		http.NotFound(w, r)
		return
	}
	f, err := os.Open(filepath.Join(s.root, rel))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			http.NotFound(w, r)
		} else {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		http.NotFound(w, r)
		return
	}
	s.requests.Add(1)
	if r.Header.Get("Range") != "" {
		s.ranges.Add(1)
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, "", st.ModTime(), f)
}
