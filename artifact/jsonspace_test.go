package artifact

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"testing"
	"testing/iotest"
	"time"

	"github.com/klauspost/compress/zstd"
)

func TestSpaceSqueezerKeepsJSON(t *testing.T) {
	for _, in := range []string{
		`{"a": "x  y",  "b" :[1,  2 ,
		3], "c": "q\"  \\", "d": "\\\"  "}`,
		`  {}  `,
		`{"name": "tab\t and  spaces\n"}`,
	} {
		var want, got any
		if err := json.Unmarshal([]byte(in), &want); err != nil {
			t.Fatalf("bad test JSON %q: %v", in, err)
		}
		out, err := io.ReadAll(iotest.OneByteReader(newSpaceSqueezer(bytes.NewReader([]byte(in)))))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("squeezed %q to invalid JSON %q: %v", in, out, err)
		}
		wb, _ := json.Marshal(want)
		gb, _ := json.Marshal(got)
		if !bytes.Equal(wb, gb) {
			t.Errorf("squeezed %q to %q: means %s, want %s", in, out, gb, wb)
		}
		if bytes.Contains(out, []byte("  {")) || bytes.Contains(out, []byte(",  ")) {
			t.Errorf("whitespace run left in %q", out)
		}
	}
}

// TestDecodeTOCWhitespaceBomb: a TOC of a few KiB that decompresses to
// 256 MiB of blanks is refused in linear time (encoding/json alone rescans
// buffered whitespace on every refill: minutes of CPU).
func TestDecodeTOCWhitespaceBomb(t *testing.T) {
	var buf bytes.Buffer
	zw, _ := zstd.NewWriter(&buf, zstd.WithEncoderLevel(zstd.SpeedFastest))
	zw.Write([]byte(`{"entries":`))
	blank := bytes.Repeat([]byte(" "), 1<<20)
	for i := 0; i < 256; i++ {
		zw.Write(blank)
	}
	zw.Write([]byte(`[]}`))
	zw.Close()
	done := make(chan error, 1)
	go func() {
		_, err := DecodeTOC(bytes.NewReader(buf.Bytes()), Limits{MaxTOCBytes: 128 << 20})
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrInvalidTOC) {
			t.Fatalf("DecodeTOC of a whitespace bomb: %v; want ErrInvalidTOC", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("DecodeTOC of a whitespace bomb did not return within 30s (quadratic whitespace scanning)")
	}
}
