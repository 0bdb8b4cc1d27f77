package converter

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// ErrUnsupportedMediaType is returned for layers Streamer cannot convert:
// foreign or encrypted layer media types and unknown compressions.
var ErrUnsupportedMediaType = errors.New("unsupported media type")

// Compression kinds returned by Decompress.
const (
	KindTar  = "tar"
	KindGzip = "gzip"
	KindZstd = "zstd"
)

var (
	magicGzip = []byte{0x1f, 0x8b}
	magicZstd = []byte{0x28, 0xb5, 0x2f, 0xfd}
	magicXz   = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
	// bzip2: "BZh", a block size digit, then the block magic (pi's digits),
	// so that a tar whose first name starts with "BZh" is not mistaken.
	magicBzip2 = []byte{0x31, 0x41, 0x59, 0x26, 0x53, 0x59}
)

// Decompress sniffs r and returns a reader of the uncompressed layer tar
// and the kind it found (KindTar, KindGzip or KindZstd). Any other
// recognised compression is refused with ErrUnsupportedMediaType. Closing
// the returned reader releases the decoder, not r.
func Decompress(r io.Reader) (io.ReadCloser, string, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	magic, err := br.Peek(10)
	if err != nil && err != io.EOF {
		return nil, "", fmt.Errorf("sniff layer compression: %w", err)
	}
	switch {
	case bytes.HasPrefix(magic, magicGzip):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, "", fmt.Errorf("open gzip layer: %w", err)
		}
		return zr, KindGzip, nil
	case bytes.HasPrefix(magic, magicZstd):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(2))
		if err != nil {
			return nil, "", fmt.Errorf("open zstd layer: %w", err)
		}
		return zr.IOReadCloser(), KindZstd, nil
	case bytes.HasPrefix(magic, magicXz):
		return nil, "", fmt.Errorf("%w: xz-compressed layer", ErrUnsupportedMediaType)
	case len(magic) == 10 && bytes.HasPrefix(magic, []byte("BZh")) && magic[3] >= '1' && magic[3] <= '9' && bytes.Equal(magic[4:], magicBzip2):
		return nil, "", fmt.Errorf("%w: bzip2-compressed layer", ErrUnsupportedMediaType)
	}
	return io.NopCloser(br), KindTar, nil
}
