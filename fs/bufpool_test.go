package fs

import (
	"testing"

	"github.com/streamer-dev/streamer/artifact"
)

// TestChunkBufs: a buffer holds the size asked for, comes back from the
// pool at its class's capacity, and buffers of no class (grown by a
// decoder, larger than any chunk) are not pooled.
func TestChunkBufs(t *testing.T) {
	for _, n := range []int64{1, 4096, 4097, 1 << 20, 1<<20 + 1, artifact.MaxChunkSize} {
		b := getChunkBuf(n)
		if len(b) != 0 || int64(cap(b)) < n || int64(cap(b)) > max(2*n, 4096) {
			t.Errorf("getChunkBuf(%d): len %d cap %d", n, len(b), cap(b))
		}
		putChunkBuf(append(b, 1))
	}
	if c := bufClass(artifact.MaxChunkSize + 1); c != -1 {
		t.Errorf("class of a buffer larger than any chunk: %d, want none", c)
	}
	if b := getChunkBuf(artifact.MaxChunkSize + 1); int64(cap(b)) != artifact.MaxChunkSize+1 {
		t.Errorf("a buffer larger than any class: cap %d", cap(b))
	}
	putChunkBuf(make([]byte, 5000)) // not a class's capacity: dropped
	if b := getChunkBuf(5000); cap(b) != 8192 {
		t.Errorf("getChunkBuf(5000) after putting back a 5000-byte buffer: cap %d, want the class's 8192", cap(b))
	}
}
