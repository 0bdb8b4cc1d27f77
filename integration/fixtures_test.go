package integration

import (
	"strings"
	"testing"

	"github.com/streamer-dev/streamer/integration/harness"
)

// capNetBindService is a security.capability xattr (VFS_CAP_REVISION_2,
// effective) granting CAP_NET_BIND_SERVICE.
var capNetBindService = string([]byte{1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})

// longName is a path component longer than the ustar 100-byte name field,
// inside a path longer than 255 bytes, so PAX path records are needed.
var longName = "deep/" + strings.Repeat("d", 120) + "/" + strings.Repeat("e", 90) + "/" + strings.Repeat("f", 200)

// richImage is a multi-layer image with every kind of tar entry the format
// must carry: deletions, opaque directories, hard links across directories,
// symlinks, xattrs, special files, long names, an empty file, odd modes and
// owners.
func richImage(t *testing.T) harness.Image {
	t.Helper()
	base, err := harness.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	owned := harness.Reg("etc/app/config", 0o640, []byte("v1\n"))
	owned.UID, owned.GID = 1000, 1001
	secret := harness.Reg("data/secret", 0o600, []byte("secret\n"))
	secret.UID, secret.GID = 123, 456
	xf := harness.Reg("data/xattr", 0o644, []byte("has xattrs\n"))
	xf.Xattrs = map[string]string{"user.streamer.test": "value", "user.empty": ""}
	capf := harness.Reg("bin/bindable", 0o755, []byte("#!/bin/sh\necho cap\n"))
	capf.Xattrs = map[string]string{"security.capability": capNetBindService}
	xd := harness.Dir("data/xdir", 0o755)
	xd.Xattrs = map[string]string{"user.dir": "d"}
	layer1 := []harness.File{
		harness.Dir("etc/app", 0o755), owned,
		harness.Dir("data", 0o755),
		harness.Reg("data/empty", 0o644, nil),
		harness.Reg("data/big", 0o644, harness.RandomBytes(7, 3<<20/2)),
		harness.Reg("data/todelete", 0o644, []byte("deleted in layer 2\n")),
		secret, xf, xd,
		harness.Symlink("data/link", "big"),
		harness.Symlink("data/abs", "/etc/app/config"),
		harness.Symlink("data/dangling", "does/not/exist"),
		harness.Dir("lib", 0o755),
		harness.Hardlink("lib/big-hardlink", "data/big"),
		harness.Hardlink("data/big-hardlink2", "data/big"),
		harness.CharDev("data/chardev", 1, 3),
		harness.BlockDev("data/blockdev", 7, 0),
		harness.Fifo("data/fifo"),
		harness.Reg("bin/setuid", 0o4755, []byte("#!/bin/sh\n")),
		harness.Dir("shared", 0o1777),
		harness.Dir("private", 0o700),
		harness.Dir("opq", 0o755), harness.Reg("opq/old1", 0o644, []byte("old1")),
		harness.Dir("opq/sub", 0o755), harness.Reg("opq/sub/old2", 0o644, []byte("old2")),
		harness.Dir("gone", 0o755), harness.Reg("gone/file", 0o644, []byte("gone")),
		capf,
		harness.Dir("deep", 0o755), harness.Dir("deep/"+strings.Repeat("d", 120), 0o755),
		harness.Dir("deep/"+strings.Repeat("d", 120)+"/"+strings.Repeat("e", 90), 0o755),
		harness.Reg(longName, 0o644, []byte("long name\n")),
	}
	layer2 := []harness.File{
		harness.Whiteout("data/todelete"),
		harness.Whiteout("gone"),
		harness.Opaque("opq"), harness.Reg("opq/new", 0o644, []byte("new")),
		harness.Reg("etc/app/config", 0o644, []byte("v2\n")),
		harness.Reg("data/added", 0o644, []byte("added in layer 2\n")),
	}
	return harness.Image{Layers: [][]harness.File{base, layer1, layer2}, Cmd: []string{"/bin/sh"}}
}
