package bench

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestNewLink(t *testing.T) {
	tests := []struct {
		id             int
		hostIP, nsIP   string
		ns, host, peer string
	}{
		{0, "10.250.0.1", "10.250.0.2", "streamer-bench-0", "sbh0", "sbn0"},
		{1, "10.250.0.5", "10.250.0.6", "streamer-bench-1", "sbh1", "sbn1"},
		{64, "10.250.1.1", "10.250.1.2", "streamer-bench-64", "sbh64", "sbn64"},
		{16383, "10.250.255.253", "10.250.255.254", "streamer-bench-16383", "sbh16383", "sbn16383"},
		{16384, "10.250.0.1", "10.250.0.2", "streamer-bench-0", "sbh0", "sbn0"},
	}
	for _, tc := range tests {
		l := NewLink(tc.id, Profiles["same-region"])
		if l.HostIP != tc.hostIP || l.NSIP != tc.nsIP || l.NS != tc.ns || l.HostIf != tc.host || l.NSIf != tc.peer {
			t.Errorf("NewLink(%d) = %+v", tc.id, l)
		}
		if len(l.HostIf) > 15 || len(l.NSIf) > 15 {
			t.Errorf("NewLink(%d): interface names longer than IFNAMSIZ-1: %q %q", tc.id, l.HostIf, l.NSIf)
		}
	}
}

func TestShapeCommands(t *testing.T) {
	tests := []struct {
		profile string
		burst   string
	}{
		{"same-region", "500000"},  // 4 ms at 125 MB/s
		{"cross-region", "100000"}, // 4 ms at 25 MB/s
	}
	for _, tc := range tests {
		t.Run(tc.profile, func(t *testing.T) {
			p := Profiles[tc.profile]
			l := NewLink(7, p)
			got := l.ShapeCommands()
			rate := map[string]string{"same-region": "1000000000bit", "cross-region": "200000000bit"}[tc.profile]
			want := [][]string{
				{"tc", "qdisc", "replace", "dev", "sbh7", "root", "tbf", "rate", rate, "burst", tc.burst, "latency", "100ms"},
				{"tc", "-n", "streamer-bench-7", "qdisc", "replace", "dev", "sbn7", "root", "tbf", "rate", rate, "burst", tc.burst, "latency", "100ms"},
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("ShapeCommands =\n%v\nwant\n%v", got, want)
			}
		})
	}
	// A slow link still gets a bucket of at least 64 KiB.
	slow := NewLink(1, Profile{Name: "slow", RateBits: 1_000_000}).ShapeCommands()
	if slow[0][10] != "65536" {
		t.Fatalf("burst of a 1 Mbit/s link = %s, want 65536", slow[0][10])
	}
	for _, c := range slow {
		if strings.Contains(strings.Join(c, " "), "netem") {
			t.Fatal("this kernel has no netem")
		}
	}
}

func TestSetupAndTeardownCommands(t *testing.T) {
	l := NewLink(3, Profiles["cross-region"])
	setup := l.SetupCommands()
	if got := strings.Join(setup[0], " "); got != "ip netns add streamer-bench-3" {
		t.Errorf("first setup command %q", got)
	}
	joined := ""
	for _, c := range setup {
		joined += strings.Join(c, " ") + "\n"
	}
	for _, want := range []string{
		"ip link add sbh3 type veth peer name sbn3 netns streamer-bench-3",
		"ip addr add 10.250.0.13/30 dev sbh3",
		"ip -n streamer-bench-3 addr add 10.250.0.14/30 dev sbn3",
		"ip -n streamer-bench-3 link set lo up",
	} {
		if !strings.Contains(joined, want+"\n") {
			t.Errorf("setup lacks %q:\n%s", want, joined)
		}
	}
	down := l.TeardownCommands()
	if strings.Join(down[0], " ") != "ip netns del streamer-bench-3" || strings.Join(down[1], " ") != "ip link del sbh3" {
		t.Errorf("teardown = %v", down)
	}
	if got := strings.Join(l.Exec("docker-registry", "serve"), " "); got != "ip netns exec streamer-bench-3 docker-registry serve" {
		t.Errorf("Exec = %q", got)
	}
}

func TestProfile(t *testing.T) {
	p := Profiles["cross-region"]
	if p.RateString() != "200 Mbit/s" || Profiles["same-region"].RateString() != "1 Gbit/s" {
		t.Errorf("rate strings %q %q", p.RateString(), Profiles["same-region"].RateString())
	}
	if got := p.TransferTime(25_000_000); got != time.Second {
		t.Errorf("25 MB at 200 Mbit/s = %v, want 1s", got)
	}
	if p.RTT != 40*time.Millisecond || Profiles["same-region"].RTT != time.Millisecond {
		t.Error("profile round trips changed")
	}
}
