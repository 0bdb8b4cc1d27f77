package fs

import (
	"encoding/binary"
	"fmt"
	"time"
)

// fuseOpNames names the FUSE opcodes (linux/fuse.h) a read-only layer is
// sent; others are reported as "op<N>".
var fuseOpNames = map[uint32]string{
	1: "lookup", 2: "forget", 3: "getattr", 5: "readlink", 14: "open", 15: "read",
	17: "statfs", 18: "release", 22: "getxattr", 23: "listxattr", 25: "flush",
	26: "init", 27: "opendir", 28: "readdir", 29: "releasedir", 34: "access",
	36: "interrupt", 42: "batch_forget", 44: "readdirplus", 46: "lseek", 52: "statx",
}

// fuseBuckets are the upper bounds (seconds) of the FUSE operation latency
// histograms: a request answered from memory takes microseconds, one that
// waits for the network tens of milliseconds.
var fuseBuckets = []float64{0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5, 30}

// maxOpcode bounds the opcodes timed one by one; higher ones share the
// last slot.
const maxOpcode = 64

// FUSEStats times the FUSE requests of the mounts it is given to
// (Options.FUSEStats), by operation, from the read of the request to the
// write of its answer. The zero value is ready to use.
type FUSEStats struct {
	ops [maxOpcode + 1]histogram
}

// observeRequest times req, a request just answered.
func (s *FUSEStats) observeRequest(req []byte, d time.Duration) {
	if s == nil || len(req) < 8 {
		return
	}
	op := min(binary.LittleEndian.Uint32(req[4:8]), maxOpcode)
	s.ops[op].observeIn(fuseBuckets, d)
}

// Snapshot returns the histogram of every operation seen, by name.
func (s *FUSEStats) Snapshot() map[string]Histogram {
	out := map[string]Histogram{}
	for op := range s.ops {
		if hs := s.ops[op].snapshotIn(fuseBuckets); hs.Count() > 0 {
			out[fuseOpName(uint32(op))] = hs
		}
	}
	return out
}

func fuseOpName(op uint32) string {
	if n, ok := fuseOpNames[op]; ok {
		return n
	}
	if op == maxOpcode {
		return fmt.Sprintf("op%d+", op)
	}
	return fmt.Sprintf("op%d", op)
}
