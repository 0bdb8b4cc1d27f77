package harness

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Node is what a filesystem tree comparison looks at for one path.
type Node struct {
	Type     string // reg, dir, symlink, char, block, fifo, socket
	Perm     uint32 // permission and setuid/setgid/sticky bits
	UID, GID uint32
	Size     int64  // regular files
	SHA256   string // regular files
	Link     string // symlink target
	Rdev     uint64 // devices
	Mtime    int64  // regular files and symlinks, seconds
	Xattrs   map[string]string
	// LinkGroup is the smallest path sharing this file's inode, when it has
	// hard links inside the tree.
	LinkGroup string
}

func (n Node) String() string {
	x := make([]string, 0, len(n.Xattrs))
	for k, v := range n.Xattrs {
		x = append(x, fmt.Sprintf("%s=%q", k, v))
	}
	sort.Strings(x)
	return fmt.Sprintf("%s %04o %d:%d size=%d sha=%.12s link=%q rdev=%d mtime=%d xattrs=[%s] hardlinks=%q",
		n.Type, n.Perm, n.UID, n.GID, n.Size, n.SHA256, n.Link, n.Rdev, n.Mtime, strings.Join(x, " "), n.LinkGroup)
}

// ignoredXattrs are set by the host (LSMs), not by the image.
var ignoredXattrs = map[string]bool{"security.selinux": true}

// ReadTree walks root without following symlinks and describes every path
// below it (root itself excluded), keyed by slash-separated relative path.
func ReadTree(root string) (map[string]Node, error) {
	out := map[string]Node{}
	inodes := map[[2]uint64][]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil || rel == "." {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return fmt.Errorf("lstat %s: %w", rel, err)
		}
		n := Node{Perm: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid}
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFREG:
			n.Type, n.Size, n.Mtime = "reg", st.Size, st.Mtim.Sec
			sum, err := fileSHA256(path)
			if err != nil {
				return fmt.Errorf("read %s: %w", rel, err)
			}
			n.SHA256 = sum
			inodes[[2]uint64{st.Dev, st.Ino}] = append(inodes[[2]uint64{st.Dev, st.Ino}], rel)
		case syscall.S_IFDIR:
			n.Type = "dir"
		case syscall.S_IFLNK:
			n.Type, n.Mtime = "symlink", st.Mtim.Sec
			n.Perm = 0 // symlink permissions mean nothing on Linux
			if n.Link, err = os.Readlink(path); err != nil {
				return fmt.Errorf("readlink %s: %w", rel, err)
			}
		case syscall.S_IFCHR:
			n.Type, n.Rdev = "char", st.Rdev
		case syscall.S_IFBLK:
			n.Type, n.Rdev = "block", st.Rdev
		case syscall.S_IFIFO:
			n.Type = "fifo"
		case syscall.S_IFSOCK:
			n.Type = "socket"
		}
		if n.Xattrs, err = readXattrs(path); err != nil {
			return fmt.Errorf("xattrs of %s: %w", rel, err)
		}
		out[rel] = n
		return nil
	})
	for _, paths := range inodes {
		if len(paths) < 2 {
			continue
		}
		sort.Strings(paths)
		for _, p := range paths {
			n := out[p]
			n.LinkGroup = paths[0]
			out[p] = n
		}
	}
	return out, err
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func readXattrs(path string) (map[string]string, error) {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(path, buf)
	if err == unix.ENOTSUP || err == unix.ENODATA {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out map[string]string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" || ignoredXattrs[name] {
			continue
		}
		val := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(path, name, val)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s: %w", name, err)
		}
		if out == nil {
			out = map[string]string{}
		}
		out[name] = string(val[:m])
	}
	return out, nil
}

// DiffTrees lists the differences between two trees read by ReadTree, one
// line per path, sorted; nil means equal.
func DiffTrees(want, got map[string]Node) []string {
	var diffs []string
	for p, w := range want {
		g, ok := got[p]
		switch {
		case !ok:
			diffs = append(diffs, fmt.Sprintf("missing %s (%s)", p, w))
		case g.String() != w.String():
			diffs = append(diffs, fmt.Sprintf("differs %s:\n\twant %s\n\tgot  %s", p, w, g))
		}
	}
	for p, g := range got {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("extra %s (%s)", p, g))
		}
	}
	sort.Strings(diffs)
	return diffs
}
