package fs

import (
	"context"
	"sort"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// blockSize is the block size reported by stat and statfs.
const blockSize = 4096

// node is any inode of a layer: directories, devices, fifos and whiteouts use
// it as is; regular files and symlinks embed it.
type node struct {
	gofs.Inode
	layer  *layer
	attr   fuse.Attr
	xattrs map[string][]byte
}

var (
	_ = (gofs.NodeGetattrer)((*node)(nil))
	_ = (gofs.NodeGetxattrer)((*node)(nil))
	_ = (gofs.NodeListxattrer)((*node)(nil))
	_ = (gofs.NodeStatfser)((*node)(nil))
)

// Getattr answers stat from the TOC.
func (n *node) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Attr = n.attr
	out.SetTimeout(n.layer.opts.AttrTimeout)
	return 0
}

// Getxattr returns one extended attribute, ENODATA when absent.
func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	v, ok := n.xattrs[attr]
	if !ok {
		return 0, syscall.ENODATA
	}
	if len(dest) < len(v) {
		// A zero-sized dest asks for the size; go-fuse turns ERANGE with
		// the size into the right answer for both cases.
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

// Listxattr returns the NUL-terminated names of the extended attributes.
func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	names := make([]string, 0, len(n.xattrs))
	size := 0
	for k := range n.xattrs {
		names = append(names, k)
		size += len(k) + 1
	}
	if len(dest) < size {
		return uint32(size), syscall.ERANGE
	}
	sort.Strings(names)
	off := 0
	for _, k := range names {
		off += copy(dest[off:], k)
		dest[off] = 0
		off++
	}
	return uint32(size), 0
}

// Statfs describes a full read-only filesystem the size of the layer tar.
func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	l := n.layer
	*out = fuse.StatfsOut{}
	out.Bsize = blockSize
	out.Frsize = blockSize
	out.Blocks = uint64((l.toc.TarSize + blockSize - 1) / blockSize)
	out.Files = uint64(l.entries)
	out.NameLen = 255
	return 0
}

// fileNode is a regular file; its data lies in the layer tar at
// entry.Offset.
type fileNode struct {
	node
	offset, size int64
	name         string // TOC name of the first entry, for logs
}

var (
	_ = (gofs.NodeOpener)((*fileNode)(nil))
	_ = (gofs.NodeReader)((*fileNode)(nil))
)

// Open allows reading only; the kernel may keep its page cache across opens
// because the content never changes.
func (f *fileNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return nil, 0, syscall.EROFS
	}
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

// Read serves file data from the chunks it touches.
func (f *fileNode) Read(ctx context.Context, fh gofs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return f.layer.read(ctx, f, dest, off)
}

// symlinkNode is a symbolic link.
type symlinkNode struct {
	node
	target []byte
}

var _ = (gofs.NodeReadlinker)((*symlinkNode)(nil))

// Readlink returns the link target as stored in the tar.
func (s *symlinkNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	return s.target, 0
}

// rootNode is the layer's root directory; it builds the tree when added.
type rootNode struct {
	node
	tree *tree
}

var _ = (gofs.NodeOnAdder)((*rootNode)(nil))

// OnAdd creates every inode of the layer once; they live as long as the
// mount (persistent inodes), with inode numbers from the TOC.
func (r *rootNode) OnAdd(ctx context.Context) {
	if r.tree == nil {
		return // already built
	}
	l := r.layer
	made := map[*tnode]*gofs.Inode{}
	var add func(parent *gofs.Inode, d *tnode)
	add = func(parent *gofs.Inode, d *tnode) {
		for _, name := range sortedNames(d) {
			ch := d.children[name]
			in, ok := made[ch]
			if !ok {
				in = parent.NewPersistentInode(ctx, l.newNode(ch), gofs.StableAttr{Mode: ch.kind, Ino: ch.ino, Gen: 1})
				made[ch] = in
			}
			parent.AddChild(name, in, false)
			if ch.isDir() && !ok {
				add(in, ch)
			}
		}
	}
	add(r.EmbeddedInode(), r.tree.root)
	r.tree = nil // the TOC entries stay referenced by the nodes; the tree goes
}

// newNode returns the InodeEmbedder for n.
func (l *layer) newNode(n *tnode) gofs.InodeEmbedder {
	attr, xattrs := n.attr(l), n.xattrs()
	switch n.kind {
	case syscall.S_IFREG:
		f := &fileNode{offset: n.entry.Offset, size: n.entry.Size, name: n.entry.Name}
		f.layer, f.attr, f.xattrs = l, attr, xattrs
		return f
	case syscall.S_IFLNK:
		s := &symlinkNode{target: []byte(n.entry.Linkname)}
		s.layer, s.attr, s.xattrs = l, attr, xattrs
		return s
	default:
		return &node{layer: l, attr: attr, xattrs: xattrs}
	}
}
