package fs

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"

	"github.com/streamer-dev/streamer/artifact"
)

// Holder keeps the /dev/fuse descriptors of mounts open in a process that
// outlives the daemon, so that a mount stays alive (the kernel keeps its
// node ids, open files and queued requests) while the daemon restarts, and
// the next daemon serves it again. internal/fdholder's Client satisfies it;
// docs/restart.md describes the whole hand-over.
type Holder interface {
	// Put keeps dev, the /dev/fuse descriptor serving mountpoint, with
	// state, opaque bytes the filesystem needs to take the mount over. It
	// replaces what was held for mountpoint.
	Put(mountpoint string, dev *os.File, state []byte) error
	// Take returns a duplicate of the descriptor held for mountpoint and
	// its state; the holder keeps its own. It returns a nil file when
	// nothing is held for mountpoint.
	Take(mountpoint string) (*os.File, []byte, error)
	// Drop closes the descriptor held for mountpoint: the mount was
	// unmounted on purpose.
	Drop(mountpoint string) error
}

var (
	defaultHolder atomic.Pointer[holderBox]
	handingOver   atomic.Bool

	activeMu sync.Mutex
	active   = map[string]*Mounted{} // mounts served by this process, by mountpoint
)

type holderBox struct{ h Holder }

// SetDefaultHolder sets the Holder of every Mount whose Options name none
// (nil: none). The daemon sets it once at start.
func SetDefaultHolder(h Holder) {
	if h == nil {
		defaultHolder.Store(nil)
		return
	}
	defaultHolder.Store(&holderBox{h})
}

// DefaultHolder returns the Holder set by SetDefaultHolder, or nil.
func DefaultHolder() Holder {
	if b := defaultHolder.Load(); b != nil {
		return b.h
	}
	return nil
}

// HandOver switches this process to hand-over mode, for a graceful
// restart: from then on, Unmount of a mount whose descriptor a Holder keeps
// stops serving it but leaves it mounted, for the next daemon to take
// over. Mounts without a holder are unmounted as usual.
func HandOver() { handingOver.Store(true) }

// Resumable reports whether the mount at mountpoint can be left in place
// for a daemon to take over: a mount this process serves, once HandOver
// was called and a Holder keeps it; or, at start, a live mount left by a
// previous daemon whose descriptor the default Holder keeps. Mount takes
// such a mount over instead of mounting again.
func Resumable(mountpoint string) bool {
	activeMu.Lock()
	m := active[mountpoint]
	activeMu.Unlock()
	if m != nil {
		return handingOver.Load() && m.held
	}
	h := DefaultHolder()
	if h == nil {
		return false
	}
	dev, b, err := h.Take(mountpoint)
	if err != nil || dev == nil {
		return false
	}
	dev.Close()
	st, err := decodeMountState(b)
	if err != nil {
		return false
	}
	return st.stillMounted(mountpoint) == nil
}

// mountStateVersion is the version of mountState. A daemon refuses state
// of another version (and mounts the layer again) rather than misreading
// it; bump it whenever the meaning of node ids or handles changes.
const mountStateVersion = 1

// mountState is what a Holder keeps next to a mount's descriptor: enough
// to check that the mount is still the one described, and the kernel's
// INIT request, which a new server replays to learn the protocol settings
// the kernel negotiated with the first one.
type mountState struct {
	Version int           `json:"version"`
	Layer   digest.Digest `json:"layer"`
	Entries int           `json:"entries"` // of the TOC: node ids are entry indexes
	Chunks  int           `json:"chunks"`
	Major   int           `json:"major"` // device of the mount, from mountinfo
	Minor   int           `json:"minor"`
	Init    []byte        `json:"init"`  // the kernel's INIT request
	Reply   []byte        `json:"reply"` // the INIT reply the kernel got
}

func decodeMountState(b []byte) (*mountState, error) {
	var st mountState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decode held mount state: %w", err)
	}
	if st.Version != mountStateVersion {
		return nil, fmt.Errorf("held mount state has version %d, this daemon reads version %d", st.Version, mountStateVersion)
	}
	if len(st.Init) < inHeaderSize {
		return nil, fmt.Errorf("held mount state has no INIT request")
	}
	return &st, nil
}

// matches reports why st does not describe a mount of toc, or nil.
func (st *mountState) matches(toc *artifact.TOC) error {
	if st.Layer != toc.Layer || st.Entries != len(toc.Entries) || st.Chunks != len(toc.Chunks) {
		return fmt.Errorf("held mount is of layer %s (%d entries, %d chunks), not of %s (%d entries, %d chunks)",
			st.Layer, st.Entries, st.Chunks, toc.Layer, len(toc.Entries), len(toc.Chunks))
	}
	return nil
}

// stillMounted checks that the topmost mount at mountpoint is the FUSE
// mount st describes. It reads the mount table, never the mount itself,
// which nobody may be serving.
func (st *mountState) stillMounted(mountpoint string) error {
	info, err := topMount(mountpoint)
	if err != nil {
		return err
	}
	if info == nil {
		return fmt.Errorf("%s is no longer mounted", mountpoint)
	}
	if info.Major != st.Major || info.Minor != st.Minor {
		return fmt.Errorf("%s is now device %d:%d (%s), not the held mount %d:%d", mountpoint, info.Major, info.Minor, info.FSType, st.Major, st.Minor)
	}
	return nil
}

// topMount returns the last (topmost) mount at mountpoint, nil if none.
func topMount(mountpoint string) (*mountinfo.Info, error) {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(mountpoint))
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	if len(ms) == 0 {
		return nil, nil
	}
	return ms[len(ms)-1], nil
}
