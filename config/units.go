package config

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Size is a number of bytes. In TOML it is an integer of bytes or a string
// with a binary unit: "512", "64KiB", "4MiB", "10GiB", "1TiB" ("B" allowed).
type Size int64

// Binary size units.
const (
	KiB Size = 1 << (10 * (iota + 1))
	MiB
	GiB
	TiB
)

var sizeUnits = []struct {
	suffix string
	mult   Size
}{{"TiB", TiB}, {"GiB", GiB}, {"MiB", MiB}, {"KiB", KiB}, {"B", 1}}

// ParseSize parses a size such as "10GiB" or "1048576".
func ParseSize(s string) (Size, error) {
	t := strings.TrimSpace(s)
	mult := Size(1)
	for _, u := range sizeUnits {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("invalid size %q: want bytes or a number with KiB, MiB, GiB or TiB", s)
	}
	if n > int64((1<<63-1)/mult) {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return Size(n) * mult, nil
}

// String writes the size in the largest unit that divides it.
func (s Size) String() string {
	for _, u := range sizeUnits[:4] {
		if s != 0 && s%u.mult == 0 {
			return strconv.FormatInt(int64(s/u.mult), 10) + u.suffix
		}
	}
	return strconv.FormatInt(int64(s), 10)
}

// MarshalText implements encoding.TextMarshaler.
func (s Size) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler (TOML strings); TOML
// integers are read as bytes directly.
func (s *Size) UnmarshalText(b []byte) error {
	v, err := ParseSize(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// Duration is a time.Duration written in TOML as a Go duration string:
// "30s", "1m30s", "500ms".
type Duration time.Duration

// String formats the duration like time.Duration.
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("invalid duration %q: want a string such as \"30s\" or \"1m\"", b)
	}
	*d = Duration(v)
	return nil
}
