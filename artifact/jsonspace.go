package artifact

import "io"

// spaceSqueezer passes JSON through with every run of whitespace outside
// strings cut to one space. encoding/json's Decoder rescans the whitespace
// it has buffered each time it refills its buffer, so a TOC of a few KiB
// that decompresses to hundreds of MiB of blanks (a zstd bomb) would cost
// quadratic time; squeezed, it costs one linear pass.
type spaceSqueezer struct {
	r        io.Reader
	buf      []byte
	inString bool // inside a JSON string
	escaped  bool // after a backslash inside a string
	space    bool // the last byte passed on was whitespace outside a string
}

func newSpaceSqueezer(r io.Reader) *spaceSqueezer {
	return &spaceSqueezer{r: r, buf: make([]byte, 32<<10)}
}

func (s *spaceSqueezer) Read(p []byte) (int, error) {
	for {
		n, err := s.r.Read(s.buf[:min(len(p), len(s.buf))])
		out := 0
		for _, c := range s.buf[:n] {
			switch {
			case s.inString:
				switch {
				case s.escaped:
					s.escaped = false
				case c == '\\':
					s.escaped = true
				case c == '"':
					s.inString = false
				}
			case c == ' ' || c == '\t' || c == '\n' || c == '\r':
				if s.space {
					continue
				}
				s.space = true
				c = ' '
			default:
				s.space = false
				s.inString = c == '"'
			}
			p[out] = c
			out++
		}
		// A read that was all squeezed away returns nothing: read on
		// rather than hand the decoder an empty read.
		if out > 0 || err != nil || n == 0 {
			return out, err
		}
	}
}
