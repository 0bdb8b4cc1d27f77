package bench

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/streamer-dev/streamer/integration/harness"
)

// Profile is a registry link: its rate and round-trip time.
type Profile struct {
	Name string
	// RateBits is the link rate in bits per second.
	RateBits int64
	// RTT is the round-trip time the delay proxy adds (half each way).
	RTT time.Duration
}

// Profiles are the link profiles the benchmark knows, by name.
var Profiles = map[string]Profile{
	"same-region":  {Name: "same-region", RateBits: 1_000_000_000, RTT: time.Millisecond},
	"cross-region": {Name: "cross-region", RateBits: 200_000_000, RTT: 40 * time.Millisecond},
}

// RateString prints the rate as tc and people write it ("200Mbit/s").
func (p Profile) RateString() string {
	switch r := p.RateBits; {
	case r%1_000_000_000 == 0:
		return fmt.Sprintf("%d Gbit/s", r/1_000_000_000)
	case r%1_000_000 == 0:
		return fmt.Sprintf("%d Mbit/s", r/1_000_000)
	default:
		return fmt.Sprintf("%d bit/s", r)
	}
}

// TransferTime is how long n bytes take at the link's rate.
func (p Profile) TransferTime(n int64) time.Duration {
	if p.RateBits <= 0 {
		return 0
	}
	return time.Duration(float64(n) * 8 / float64(p.RateBits) * float64(time.Second))
}

// Link is a veth pair between the host and a network namespace the
// benchmark creates, with a /30 of 10.250.0.0/16 on it.
type Link struct {
	NS           string // network namespace name
	HostIf, NSIf string // veth ends
	HostIP, NSIP string // addresses, without prefix length
	Profile      Profile
}

// NewLink names a link from a small id (0..16383): namespace
// streamer-bench-<id>, veth sbh<id>/sbn<id>, addresses 10.250.x.y/30.
func NewLink(id int, p Profile) Link {
	id %= 16384
	base := id * 4 // a /30 per id within 10.250.0.0/16
	third, fourth := base/256, base%256
	return Link{
		NS:      fmt.Sprintf("streamer-bench-%d", id),
		HostIf:  fmt.Sprintf("sbh%d", id),
		NSIf:    fmt.Sprintf("sbn%d", id),
		HostIP:  fmt.Sprintf("10.250.%d.%d", third, fourth+1),
		NSIP:    fmt.Sprintf("10.250.%d.%d", third, fourth+2),
		Profile: p,
	}
}

// SetupCommands create the namespace and the veth pair, address both ends
// and bring them (and the namespace's loopback) up.
func (l Link) SetupCommands() [][]string {
	return [][]string{
		{"ip", "netns", "add", l.NS},
		{"ip", "link", "add", l.HostIf, "type", "veth", "peer", "name", l.NSIf, "netns", l.NS},
		{"ip", "addr", "add", l.HostIP + "/30", "dev", l.HostIf},
		{"ip", "link", "set", l.HostIf, "up"},
		{"ip", "-n", l.NS, "addr", "add", l.NSIP + "/30", "dev", l.NSIf},
		{"ip", "-n", l.NS, "link", "set", l.NSIf, "up"},
		{"ip", "-n", l.NS, "link", "set", "lo", "up"},
	}
}

// ShapeCommands rate-limit both directions of the link with a token bucket
// (tbf) on each veth end's egress: the namespace end shapes what the
// registry sends, the host end what the node sends. The bucket holds 4 ms
// of traffic (at least 64 KiB) so a 1 Gbit/s link reaches its rate, and
// at most 100 ms of packets queue.
func (l Link) ShapeCommands() [][]string {
	rate := strconv.FormatInt(l.Profile.RateBits, 10) + "bit"
	burst := l.Profile.RateBits / 8 / 250
	if burst < 64<<10 {
		burst = 64 << 10
	}
	tbf := []string{"root", "tbf", "rate", rate, "burst", strconv.FormatInt(burst, 10), "latency", "100ms"}
	return [][]string{
		append([]string{"tc", "qdisc", "replace", "dev", l.HostIf}, tbf...),
		append([]string{"tc", "-n", l.NS, "qdisc", "replace", "dev", l.NSIf}, tbf...),
	}
}

// TeardownCommands delete the namespace (which destroys the veth pair);
// the second deletes the host end in case the namespace was gone first.
func (l Link) TeardownCommands() [][]string {
	return [][]string{
		{"ip", "netns", "del", l.NS},
		{"ip", "link", "del", l.HostIf},
	}
}

// Exec returns the command line that runs argv inside the namespace.
func (l Link) Exec(argv ...string) []string {
	return append([]string{"ip", "netns", "exec", l.NS}, argv...)
}

// run runs commands in order, stopping at the first failure.
func runAll(ctx context.Context, cmds [][]string) error {
	for _, c := range cmds {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := harness.RunCommand(cctx, nil, c[0], c[1:]...)
		cancel()
		if err != nil {
			return err
		}
	}
	return nil
}

// Up checks that the names and addresses are free, creates the link and
// registers its teardown with t (also run on failure and on Ctrl-C by the
// runner). It does not shape it: Shape does.
func (l Link) Up(t harness.TB, ctx context.Context) error {
	t.Helper()
	if _, err := os.Stat("/run/netns/" + l.NS); err == nil {
		return fmt.Errorf("network namespace %s exists already (another benchmark running, or left behind: ip netns del %s)", l.NS, l.NS)
	}
	if _, err := os.Stat("/sys/class/net/" + l.HostIf); err == nil {
		return fmt.Errorf("interface %s exists already", l.HostIf)
	}
	out, err := harness.RunCommand(ctx, nil, "ip", "-o", "addr", "show")
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	if strings.Contains(out, " "+l.HostIP+"/") || strings.Contains(out, " "+l.NSIP+"/") {
		return fmt.Errorf("address %s or %s is in use on this machine; the benchmark needs a free /30 of 10.250.0.0/16", l.HostIP, l.NSIP)
	}
	t.Cleanup(func() { l.Down() })
	if err := runAll(ctx, l.SetupCommands()); err != nil {
		return fmt.Errorf("create link %s: %w", l.NS, err)
	}
	return nil
}

// Shape applies the profile's rate (the delay is the proxy's).
func (l Link) Shape(ctx context.Context) error {
	if err := runAll(ctx, l.ShapeCommands()); err != nil {
		return fmt.Errorf("shape link %s to %s: %w", l.NS, l.Profile.RateString(), err)
	}
	return nil
}

// Down removes the namespace and the veth pair (best effort).
func (l Link) Down() {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, c := range l.TeardownCommands() {
		_, _ = harness.RunCommand(ctx, nil, c[0], c[1:]...)
	}
}

// RxBytes are the bytes the host end has received: everything the
// registry's namespace sent, headers included.
func (l Link) RxBytes() (int64, error) {
	b, err := os.ReadFile("/sys/class/net/" + l.HostIf + "/statistics/rx_bytes")
	if err != nil {
		return 0, fmt.Errorf("read link counter: %w", err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse link counter %q: %w", b, err)
	}
	return n, nil
}
