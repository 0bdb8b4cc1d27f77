package artifact

import "fmt"

// Limits bound what a decoder accepts. Zero fields take the defaults.
type Limits struct {
	MaxTOCBytes int64 // uncompressed TOC JSON size
	MaxEntries  int
	MaxChunks   int
	MaxNameLen  int
	MaxXattrs   int   // per entry
	MaxTarSize  int64 // uncompressed layer size
}

// DefaultLimits are generous for real images and small enough that a
// hostile TOC cannot exhaust a node's memory.
var DefaultLimits = Limits{
	MaxTOCBytes: 512 << 20,
	MaxEntries:  2_000_000,
	MaxChunks:   4_000_000,
	MaxNameLen:  4096,
	MaxXattrs:   128,
	MaxTarSize:  1 << 42,
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	if l.MaxTOCBytes > 0 {
		d.MaxTOCBytes = l.MaxTOCBytes
	}
	if l.MaxEntries > 0 {
		d.MaxEntries = l.MaxEntries
	}
	if l.MaxChunks > 0 {
		d.MaxChunks = l.MaxChunks
	}
	if l.MaxNameLen > 0 {
		d.MaxNameLen = l.MaxNameLen
	}
	if l.MaxXattrs > 0 {
		d.MaxXattrs = l.MaxXattrs
	}
	if l.MaxTarSize > 0 {
		d.MaxTarSize = l.MaxTarSize
	}
	return d
}

// Validate checks every rule of docs/format.md and returns an error wrapping
// ErrInvalidTOC that names the first offending entry or chunk.
// TODO(artifact helper): full rules.
func (t *TOC) Validate(lim Limits) error {
	lim = lim.withDefaults()
	if t.Version != TOCVersion {
		return fmt.Errorf("%w: version %d, want %d", ErrInvalidTOC, t.Version, TOCVersion)
	}
	return nil
}
