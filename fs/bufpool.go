package fs

import (
	"math/bits"
	"sync"

	"github.com/streamer-dev/streamer/artifact"
)

// Buffers for decoded chunks that nothing keeps (background and prefetch
// runs store their chunks and drop them), recycled in power-of-two size
// classes from 4 KiB to artifact.MaxChunkSize.
const minBufShift = 12

var chunkBufs = make([]sync.Pool, bits.Len64(artifact.MaxChunkSize-1)-minBufShift+1)

// bufClass is the size class holding n bytes, -1 when n is larger than
// the largest class.
func bufClass(n int64) int {
	c := 0
	if n > 1<<minBufShift {
		c = bits.Len64(uint64(n-1)) - minBufShift
	}
	if c >= len(chunkBufs) {
		return -1
	}
	return c
}

// getChunkBuf returns an empty buffer of capacity at least n.
func getChunkBuf(n int64) []byte {
	c := bufClass(n)
	if c < 0 {
		return make([]byte, 0, n)
	}
	if p, ok := chunkBufs[c].Get().(*[]byte); ok {
		return (*p)[:0]
	}
	return make([]byte, 0, 1<<(c+minBufShift))
}

// putChunkBuf gives b back for reuse; b must not be used after. A buffer
// not of a class's exact capacity (grown by a decoder) is left to the
// garbage collector.
func putChunkBuf(b []byte) {
	c := bufClass(int64(cap(b)))
	if c < 0 || cap(b) != 1<<(c+minBufShift) {
		return
	}
	b = b[:0]
	chunkBufs[c].Put(&b)
}
