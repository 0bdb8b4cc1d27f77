package cache

import (
	"container/list"
	"fmt"
	"os"
	"sync"
)

// openPacks keeps the files of the packs read last open: a chunk read
// from a pack is then one pread instead of an open, a pread and a close.
// A layer's check reads every chunk of the layer, thousands of small ones
// for a layer of small files, and a starting container's reads go to the
// packs its own chunks were just written to.
//
// A pack's file is open while it is among the max most recently read, or
// while a reader still uses it; it is closed once neither holds, and at
// once when the pack is dropped (its file is removed: an open descriptor
// would keep its blocks).
type openPacks struct {
	mu  sync.Mutex
	max int
	lru *list.List // of *pack with an open file, most recently read first
}

// packFile is the open file of a pack; its fields are openPacks.mu's.
type packFile struct {
	f    *os.File
	refs int           // readers using f
	el   *list.Element // in openPacks.lru, nil when not
	gone bool          // the pack was dropped: never opened again
}

// openPacksMax is how many pack files stay open for reads.
const openPacksMax = 64

func newOpenPacks(max int) *openPacks {
	return &openPacks{max: max, lru: list.New()}
}

// open returns pk's file for reading and the function that gives it back.
func (c *openPacks) open(pk *pack) (*os.File, func(), error) {
	c.mu.Lock()
	if pf := &pk.file; pf.f != nil {
		pf.refs++
		if !pf.gone {
			c.touchLocked(pk) // a dropped pack's file closes with its last reader
		}
		c.mu.Unlock()
		return pf.f, func() { c.release(pk) }, nil
	}
	c.mu.Unlock()
	f, err := os.Open(pk.path)
	if err != nil {
		return nil, nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if pf := &pk.file; pf.f == nil && !pf.gone && c.max > 0 {
		pf.f, pf.refs = f, 1
		c.touchLocked(pk)
		return f, func() { c.release(pk) }, nil
	}
	// Opened by another reader meanwhile, or dropped: this file is the
	// caller's alone.
	return f, func() { f.Close() }, nil
}

// touchLocked makes pk the most recently read pack and closes the files
// of the least recent ones over max that no reader uses.
func (c *openPacks) touchLocked(pk *pack) {
	if pk.file.el != nil {
		c.lru.MoveToFront(pk.file.el)
	} else {
		pk.file.el = c.lru.PushFront(pk)
	}
	for c.lru.Len() > c.max {
		old := c.lru.Back().Value.(*pack)
		c.lru.Remove(old.file.el)
		old.file.el = nil
		c.closeIdleLocked(old)
	}
}

// release gives back a reader's use of pk's file.
func (c *openPacks) release(pk *pack) {
	c.mu.Lock()
	defer c.mu.Unlock()
	pk.file.refs--
	if pk.file.el == nil {
		c.closeIdleLocked(pk)
	}
}

// forget closes pk's file once no reader uses it and never opens it
// again: the pack is dropped.
func (c *openPacks) forget(pk *pack) {
	c.mu.Lock()
	defer c.mu.Unlock()
	pk.file.gone = true
	if pk.file.el != nil {
		c.lru.Remove(pk.file.el)
		pk.file.el = nil
	}
	c.closeIdleLocked(pk)
}

// closeAll closes every file no reader uses; the others close as their
// readers give them back.
func (c *openPacks) closeAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for el := c.lru.Front(); el != nil; {
		next := el.Next()
		pk := el.Value.(*pack)
		c.lru.Remove(el)
		pk.file.el = nil
		c.closeIdleLocked(pk)
		el = next
	}
	c.max = 0
}

// closeIdleLocked closes pk's file when it is open and unused.
func (c *openPacks) closeIdleLocked(pk *pack) {
	if pf := &pk.file; pf.f != nil && pf.refs == 0 {
		pf.f.Close()
		pf.f = nil
	}
}

// readPacked reads the bytes of one chunk of a pack, into buf when its
// capacity holds them (a new slice otherwise).
func (s *Store) readPacked(e *diskEntry, buf []byte) ([]byte, error) {
	f, release, err := s.openPacks.open(e.pack)
	if err != nil {
		return nil, err
	}
	defer release()
	b := sized(buf, e.size)
	if _, err := f.ReadAt(b, e.off); err != nil {
		return nil, fmt.Errorf("read chunk at %d of pack %s: %w", e.off, e.pack.path, err)
	}
	return b, nil
}
