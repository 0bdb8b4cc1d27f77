package fs

import (
	"context"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/streamer-dev/streamer/artifact"
)

// rawFS answers the kernel's FUSE requests for one layer on go-fuse's raw
// API. It keeps no per-request or per-open state: the kernel's node id of
// every name is its inode number from the TOC, and file and directory
// handles are always 0. Any process that has the TOC can therefore answer
// any request of a mount, including for nodes and open files that an
// earlier process handed out: that is what lets a restarted daemon take
// over a live mount (see Mount and docs/restart.md).
type rawFS struct {
	fuse.RawFileSystem // ENOSYS for everything not below
	layer              *layer
	nodes              []*tnode // by inode number (= kernel node id); nil holes
	entryTimeout       time.Duration
	attrTimeout        time.Duration
	negativeTimeout    time.Duration
}

var _ fuse.RawFileSystem = (*rawFS)(nil)

// newRawFS indexes the tree of toc by inode number.
func newRawFS(toc *artifact.TOC, r ChunkReader, opts Options) (*rawFS, error) {
	root, err := newRoot(toc, r, opts)
	if err != nil {
		return nil, err
	}
	l := root.layer
	fs := &rawFS{
		RawFileSystem:   fuse.NewDefaultRawFileSystem(),
		layer:           l,
		entryTimeout:    l.opts.EntryTimeout,
		attrTimeout:     l.opts.AttrTimeout,
		negativeTimeout: l.opts.NegativeTimeout,
	}
	var index func(d *tnode)
	index = func(d *tnode) {
		fs.put(d)
		d.names = sortedNames(d)
		for _, name := range d.names {
			ch := d.children[name]
			if ch.isDir() {
				index(ch)
			} else {
				fs.put(ch)
			}
		}
	}
	index(root.tree.root)
	if l.opts.Push {
		l.push = newPusher(toc, fs.nodes, l.opts.PushedBytes)
	}
	return fs, nil
}

func (fs *rawFS) put(n *tnode) {
	for uint64(len(fs.nodes)) <= n.ino {
		fs.nodes = append(fs.nodes, nil)
	}
	fs.nodes[n.ino] = n
}

// node returns the node of a kernel node id, nil when there is none.
func (fs *rawFS) node(id uint64) *tnode {
	if id >= uint64(len(fs.nodes)) {
		return nil
	}
	return fs.nodes[id]
}

func (fs *rawFS) String() string { return "streamer" }

func (fs *rawFS) fillEntry(n *tnode, out *fuse.EntryOut) {
	out.NodeId = n.ino
	out.Generation = 1
	out.Attr = n.attr(fs.layer)
	out.SetEntryTimeout(fs.entryTimeout)
	out.SetAttrTimeout(fs.attrTimeout)
}

// Lookup answers a name in a directory; a missing name is cached
// negatively (node id 0), as the content never changes.
func (fs *rawFS) Lookup(cancel <-chan struct{}, header *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	d := fs.node(header.NodeId)
	if d == nil {
		return fuse.Status(syscall.ESTALE)
	}
	if !d.isDir() {
		return fuse.Status(syscall.ENOTDIR)
	}
	ch := d.children[name]
	if ch == nil {
		*out = fuse.EntryOut{}
		out.SetEntryTimeout(fs.negativeTimeout)
		return fuse.OK
	}
	fs.fillEntry(ch, out)
	return fuse.OK
}

// Forget needs no work: nodes live as long as the TOC.
func (fs *rawFS) Forget(nodeid, nlookup uint64) {}

func (fs *rawFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	n := fs.node(in.NodeId)
	if n == nil {
		return fuse.Status(syscall.ESTALE)
	}
	out.Attr = n.attr(fs.layer)
	out.SetTimeout(fs.attrTimeout)
	return fuse.OK
}

// Access checks mode bits against the caller, as the kernel would with
// default_permissions.
func (fs *rawFS) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	n := fs.node(in.NodeId)
	if n == nil {
		return fuse.Status(syscall.ESTALE)
	}
	if in.Mask&unixWOK != 0 {
		return fuse.EROFS
	}
	if !hasAccess(in.Uid, in.Gid, n.attr(fs.layer), in.Mask) {
		return fuse.EACCES
	}
	return fuse.OK
}

const (
	unixROK = 4
	unixWOK = 2
	unixXOK = 1
)

func hasAccess(uid, gid uint32, a fuse.Attr, mask uint32) bool {
	mask &= unixROK | unixWOK | unixXOK
	if uid == 0 {
		return mask&unixXOK == 0 || a.Mode&0o111 != 0 || a.Mode&syscall.S_IFMT == syscall.S_IFDIR
	}
	perm := a.Mode & 0o7
	switch {
	case uid == a.Uid:
		perm = a.Mode >> 6 & 0o7
	case gid == a.Gid:
		perm = a.Mode >> 3 & 0o7
	}
	return perm&mask == mask
}

func (fs *rawFS) Readlink(cancel <-chan struct{}, header *fuse.InHeader) ([]byte, fuse.Status) {
	n := fs.node(header.NodeId)
	if n == nil {
		return nil, fuse.Status(syscall.ESTALE)
	}
	if n.kind != syscall.S_IFLNK {
		return nil, fuse.EINVAL
	}
	return []byte(n.entry.Linkname), fuse.OK
}

func (fs *rawFS) GetXAttr(cancel <-chan struct{}, header *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	n := fs.node(header.NodeId)
	if n == nil {
		return 0, fuse.Status(syscall.ESTALE)
	}
	v, ok := n.xattrs()[attr]
	if !ok {
		return 0, fuse.ENOATTR
	}
	if len(dest) < len(v) {
		return uint32(len(v)), fuse.ERANGE
	}
	return uint32(copy(dest, v)), fuse.OK
}

func (fs *rawFS) ListXAttr(cancel <-chan struct{}, header *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	n := fs.node(header.NodeId)
	if n == nil {
		return 0, fuse.Status(syscall.ESTALE)
	}
	nd := node{xattrs: n.xattrs()}
	size, errno := nd.Listxattr(context.Background(), dest)
	return size, fuse.Status(errno)
}

// Open allows reading only. The handle is 0: reads need nothing but the
// node id, so a handle outlives the process that gave it.
func (fs *rawFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n := fs.node(in.NodeId)
	if n == nil {
		return fuse.Status(syscall.ESTALE)
	}
	if in.Flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return fuse.EROFS
	}
	if n.isDir() {
		return fuse.EISDIR
	}
	out.Fh = 0
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE
	fs.opened(n)
	return fuse.OK
}

// Read serves file data from the chunks it touches; a request the kernel
// interrupts cancels its fetch.
func (fs *rawFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	n := fs.node(in.NodeId)
	if n == nil {
		return nil, fuse.Status(syscall.ESTALE)
	}
	if n.kind != syscall.S_IFREG {
		return nil, fuse.EINVAL
	}
	ctx, stop := cancelContext(cancel)
	defer stop()
	res, errno := fs.layer.readFile(ctx, in.Pid, n.entry.Offset, n.entry.Size, n.entry.Name, buf, int64(in.Offset))
	return res, fuse.Status(errno)
}

// cancelContext returns a context canceled when cancel is closed.
func cancelContext(cancel <-chan struct{}) (context.Context, context.CancelFunc) {
	ctx, stop := context.WithCancel(context.Background())
	if cancel != nil {
		go func() {
			select {
			case <-cancel:
				stop()
			case <-ctx.Done():
			}
		}()
	}
	return ctx, stop
}

func (fs *rawFS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {}

// Flush is left unimplemented (ENOSYS): the kernel then stops sending
// it, so close(2) never waits for the daemon, not even while it restarts.

func (fs *rawFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n := fs.node(in.NodeId)
	if n == nil {
		return fuse.Status(syscall.ESTALE)
	}
	if !n.isDir() {
		return fuse.ENOTDIR
	}
	out.Fh = 0
	// Listings never change: the kernel may cache them.
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_CACHE_DIR
	return fuse.OK
}

func (fs *rawFS) ReleaseDir(in *fuse.ReleaseIn) {}

// ReadDir lists ".", ".." and the sorted names of a directory; the offset
// of an entry is its index plus one, so a listing resumes anywhere without
// state.
func (fs *rawFS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, false)
}

func (fs *rawFS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, true)
}

func (fs *rawFS) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	d := fs.node(in.NodeId)
	if d == nil {
		return fuse.Status(syscall.ESTALE)
	}
	if !d.isDir() {
		return fuse.ENOTDIR
	}
	total := uint64(len(d.names)) + 2
	for i := in.Offset; i < total; i++ {
		e := fuse.DirEntry{Off: i + 1}
		var ch *tnode
		switch i {
		case 0:
			e.Name, e.Mode, e.Ino = ".", syscall.S_IFDIR, d.ino
		case 1:
			// The parent's inode number is not kept; the kernel does not
			// use it, and readdir callers only skip "..".
			e.Name, e.Mode, e.Ino = "..", syscall.S_IFDIR, fuse.FUSE_ROOT_ID
		default:
			e.Name = d.names[i-2]
			ch = d.children[e.Name]
			e.Mode, e.Ino = ch.kind, ch.ino
		}
		if !plus {
			if !out.AddDirEntry(e) {
				break
			}
			continue
		}
		eo := out.AddDirLookupEntry(e)
		if eo == nil {
			break
		}
		if ch != nil {
			// The kernel takes a lookup reference for these entries;
			// with node ids from the TOC there is nothing to count.
			fs.fillEntry(ch, eo)
		}
	}
	return fuse.OK
}

func (fs *rawFS) StatFs(cancel <-chan struct{}, header *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	nd := node{layer: fs.layer}
	return fuse.Status(nd.Statfs(context.Background(), out))
}

// Writes of any kind: the layer is read-only.
func (fs *rawFS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) RemoveXAttr(cancel <-chan struct{}, header *fuse.InHeader, attr string) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) Unlink(cancel <-chan struct{}, header *fuse.InHeader, name string) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) Rmdir(cancel <-chan struct{}, header *fuse.InHeader, name string) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) Symlink(cancel <-chan struct{}, header *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	return fuse.EROFS
}
func (fs *rawFS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	return 0, fuse.EROFS
}
