package harness

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// CRI is a client of containerd's CRI API, used the way kubelet uses it.
type CRI struct {
	Runtime runtime.RuntimeServiceClient
	Image   runtime.ImageServiceClient
	conn    *grpc.ClientConn
}

// DialCRI connects to the CRI API on a unix socket.
func DialCRI(ctx context.Context, socket string) (*CRI, error) {
	conn, err := grpc.DialContext(ctx, "unix://"+socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return nil, fmt.Errorf("dial CRI %s: %w", socket, err)
	}
	return &CRI{Runtime: runtime.NewRuntimeServiceClient(conn), Image: runtime.NewImageServiceClient(conn), conn: conn}, nil
}

// Close closes the connection.
func (c *CRI) Close() error { return c.conn.Close() }

// CRI connects to the daemon's CRI API; the connection closes on cleanup.
func (c *Containerd) CRI(t TB) *CRI {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cri, err := DialCRI(ctx, c.Address)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() { cri.Close() })
	return cri
}

// PullImage pulls ref through CRI and returns the image id. Like kubelet,
// it retries while the error is Unavailable (containerd reconnecting to a
// restarted snapshotter), within ctx.
func (c *CRI) PullImage(ctx context.Context, ref string) (string, error) {
	for {
		resp, err := c.Image.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: ref}})
		if err == nil {
			return resp.ImageRef, nil
		}
		if status.Code(err) != codes.Unavailable {
			return "", fmt.Errorf("CRI pull %s: %w", ref, err)
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("CRI pull %s: %w (gave up retrying: %v)", ref, err, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// RemoveImage removes an image through CRI.
func (c *CRI) RemoveImage(ctx context.Context, ref string) error {
	if _, err := c.Image.RemoveImage(ctx, &runtime.RemoveImageRequest{Image: &runtime.ImageSpec{Image: ref}}); err != nil {
		return fmt.Errorf("CRI remove image %s: %w", ref, err)
	}
	return nil
}

var podSeq atomic.Int64

func hostNetwork() *runtime.NamespaceOption {
	return &runtime.NamespaceOption{Network: runtime.NamespaceMode_NODE, Pid: runtime.NamespaceMode_CONTAINER, Ipc: runtime.NamespaceMode_POD}
}

// Pod is a running pod sandbox on host networking.
type Pod struct {
	ID     string
	Config *runtime.PodSandboxConfig
	cri    *CRI
}

// PodsCgroup is the cgroup under which pods run, as kubelet's cgroupfs
// driver places BestEffort pods: kubepods/besteffort/pod<uid>. The
// snapshotter's background fetch watches kubepods (fetch.
// background_yield_cgroups).
const PodsCgroup = "/kubepods/besteffort"

// RunPod runs a pod sandbox named name on host networking, in a cgroup
// of its own under PodsCgroup.
func (c *CRI) RunPod(ctx context.Context, name, logDir string) (*Pod, error) {
	n := podSeq.Add(1)
	uid := fmt.Sprintf("%s-%d-%d", name, os.Getpid(), n)
	cfg := &runtime.PodSandboxConfig{
		Metadata: &runtime.PodSandboxMetadata{
			Name: name, Namespace: "default", Uid: uid,
		},
		LogDirectory: logDir,
		Linux: &runtime.LinuxPodSandboxConfig{
			CgroupParent:    PodsCgroup + "/pod" + uid,
			SecurityContext: &runtime.LinuxSandboxSecurityContext{NamespaceOptions: hostNetwork()},
		},
	}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, fmt.Errorf("pod log dir: %w", err)
	}
	resp, err := c.Runtime.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg})
	if err != nil {
		return nil, fmt.Errorf("CRI run pod %s: %w", name, err)
	}
	return &Pod{ID: resp.PodSandboxId, Config: cfg, cri: c}, nil
}

// Remove stops and removes the pod and its containers.
func (p *Pod) Remove(ctx context.Context) error {
	if _, err := p.cri.Runtime.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: p.ID}); err != nil {
		return fmt.Errorf("CRI stop pod %s: %w", p.ID, err)
	}
	if _, err := p.cri.Runtime.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: p.ID}); err != nil {
		return fmt.Errorf("CRI remove pod %s: %w", p.ID, err)
	}
	removePodCgroup(p.Config.GetLinux().GetCgroupParent())
	return nil
}

// removePodCgroup removes a pod's cgroup, which runc created with its
// first container and leaves (kubelet removes it), in every hierarchy,
// and its parents up to kubepods when they are empty (but not those
// NodeCPU keeps).
func removePodCgroup(parent string) {
	if parent == "" {
		return
	}
	roots, _ := filepath.Glob("/sys/fs/cgroup/*")
	roots = append(roots, "/sys/fs/cgroup")
	for _, r := range roots {
		for d := parent; d != "/" && d != "."; d = filepath.Dir(d) {
			if _, kept := keptCgroups.Load(filepath.Join(r, d)); kept {
				break // NodeCPU's, with its shares
			}
			if err := os.Remove(filepath.Join(r, d)); err != nil {
				break // not there, or still holding others' cgroups
			}
		}
	}
}

// ContainerSpec describes a container to start in a pod.
type ContainerSpec struct {
	Name    string
	Image   string
	Command []string
	Args    []string
}

// StartContainer pulls nothing: the image must have been pulled. It creates
// and starts the container and returns its id.
func (p *Pod) StartContainer(ctx context.Context, s ContainerSpec) (string, error) {
	cfg := &runtime.ContainerConfig{
		Metadata: &runtime.ContainerMetadata{Name: s.Name},
		Image:    &runtime.ImageSpec{Image: s.Image},
		Command:  s.Command,
		Args:     s.Args,
		LogPath:  s.Name + ".log",
		Linux: &runtime.LinuxContainerConfig{
			SecurityContext: &runtime.LinuxContainerSecurityContext{NamespaceOptions: hostNetwork()},
		},
	}
	cr, err := p.cri.Runtime.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: p.ID, Config: cfg, SandboxConfig: p.Config})
	if err != nil {
		return "", fmt.Errorf("CRI create container %s from %s: %w", s.Name, s.Image, err)
	}
	if _, err := p.cri.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: cr.ContainerId}); err != nil {
		return cr.ContainerId, fmt.Errorf("CRI start container %s: %w", s.Name, err)
	}
	return cr.ContainerId, nil
}

// LogPath is where CRI writes a container's log in the pod.
func (p *Pod) LogPath(name string) string { return filepath.Join(p.Config.LogDirectory, name+".log") }

// WaitRunning waits until the container's state is RUNNING.
func (c *CRI) WaitRunning(ctx context.Context, id string) error {
	return WaitFor(ctx, nil, "container "+id+" running", func(ctx context.Context) error {
		resp, err := c.Runtime.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: id})
		if err != nil {
			return err
		}
		switch st := resp.Status.State; st {
		case runtime.ContainerState_CONTAINER_RUNNING:
			return nil
		case runtime.ContainerState_CONTAINER_EXITED:
			return fmt.Errorf("container exited: code %d, reason %q, %s", resp.Status.ExitCode, resp.Status.Reason, resp.Status.Message)
		default:
			return fmt.Errorf("container state %s", st)
		}
	})
}

// ExecResult is the outcome of ExecSync.
type ExecResult struct {
	Stdout, Stderr string
	ExitCode       int32
}

// Exec runs cmd in the container and waits for it (timeout seconds).
func (c *CRI) Exec(ctx context.Context, id string, timeout time.Duration, cmd ...string) (ExecResult, error) {
	resp, err := c.Runtime.ExecSync(ctx, &runtime.ExecSyncRequest{ContainerId: id, Cmd: cmd, Timeout: int64(timeout / time.Second)})
	if err != nil {
		return ExecResult{}, fmt.Errorf("CRI exec %v in %s: %w", cmd, id, err)
	}
	return ExecResult{Stdout: string(resp.Stdout), Stderr: string(resp.Stderr), ExitCode: resp.ExitCode}, nil
}

// RemoveAllPods stops and removes every pod sandbox (best effort, logged).
func (c *CRI) RemoveAllPods(ctx context.Context, t TB) {
	resp, err := c.Runtime.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
	if err != nil {
		t.Logf("list pods: %v", err)
		return
	}
	for _, p := range resp.Items {
		pod := &Pod{ID: p.Id, cri: c}
		if err := pod.Remove(ctx); err != nil {
			t.Logf("remove pod: %v", err)
		}
	}
}

// WaitHTTP waits until GET url answers 200 and returns the body.
func WaitHTTP(ctx context.Context, url string) (string, error) {
	var body string
	err := WaitFor(ctx, nil, "GET "+url, func(ctx context.Context) error {
		b, err := HTTPGet(ctx, url)
		body = b
		return err
	})
	return body, err
}

// HTTPGet fetches url and returns its body, failing on a non-200 status.
func HTTPGet(ctx context.Context, url string) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(cctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	tr := &http.Transport{DialContext: (&net.Dialer{Timeout: time.Second}).DialContext, DisableKeepAlives: true}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(b), nil
}

// WebPod is a pod running one web container from an image.
type WebPod struct {
	*Pod
	Container string
	Port      int
	URL       string
}

// RunWebPod pulls image through CRI, runs it in a new pod serving /www with
// busybox httpd on a free port, waits until the page answers, and removes
// the pod on cleanup.
func (c *CRI) RunWebPod(t TB, ctx context.Context, name, image, logDir string) *WebPod {
	t.Helper()
	if _, err := c.PullImage(ctx, image); err != nil {
		t.Fatalf("%v", err)
	}
	pod, err := c.RunPod(ctx, name, logDir)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := pod.Remove(cctx); err != nil {
			t.Logf("%v", err)
		}
	})
	port, err := FreePort()
	if err != nil {
		t.Fatalf("%v", err)
	}
	cmd := HTTPDCommand(port)
	id, err := pod.StartContainer(ctx, ContainerSpec{Name: name, Image: image, Command: cmd[:1], Args: cmd[1:]})
	if err != nil {
		t.Fatalf("%v", err)
	}
	w := &WebPod{Pod: pod, Container: id, Port: port, URL: fmt.Sprintf("http://127.0.0.1:%d/", port)}
	if err := c.WaitRunning(ctx, id); err != nil {
		t.Fatalf("%v\ncontainer log: %s", err, FileTail(pod.LogPath(name), 20))
	}
	if _, err := WaitHTTP(ctx, w.URL); err != nil {
		t.Fatalf("%v\ncontainer log: %s", err, FileTail(pod.LogPath(name), 20))
	}
	return w
}

// Exec runs a shell command line in the web container.
func (w *WebPod) Exec(ctx context.Context, script string) (ExecResult, error) {
	return w.cri.Exec(ctx, w.Container, 30*time.Second, "/bin/sh", "-c", script)
}

// TrimOutput trims whitespace from command output.
func TrimOutput(s string) string { return strings.TrimSpace(s) }
