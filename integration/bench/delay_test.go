package bench

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// echoServer echoes every connection on loopback until the test ends.
func echoServer(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return l.Addr().String()
}

func startDelay(t *testing.T, upstream string, oneWay time.Duration) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- DelayProxy{Upstream: upstream, OneWay: oneWay}.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("delay proxy did not stop within 5s of its context ending")
		}
	})
	return l.Addr().String()
}

func TestDelayProxyAddsRoundTrip(t *testing.T) {
	const oneWay = 30 * time.Millisecond
	addr := startDelay(t, echoServer(t), oneWay)
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4)
	var best time.Duration
	for i := 0; i < 3; i++ {
		start := time.Now()
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		if rtt := time.Since(start); best == 0 || rtt < best {
			best = rtt
		}
	}
	if string(buf) != "ping" {
		t.Fatalf("echo %q", buf)
	}
	// Both directions are delayed: a round trip takes at least 2*oneWay.
	if best < 2*oneWay {
		t.Fatalf("round trip %v through the proxy, want at least %v", best, 2*oneWay)
	}
}

func TestDelayProxyKeepsBytesAndThroughput(t *testing.T) {
	// 8 MiB through a 20 ms delay line: the bytes arrive intact and in
	// order, and the transfer is not 20 ms per read (which would take
	// minutes with 64 KiB reads).
	addr := startDelay(t, echoServer(t), 20*time.Millisecond)
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>11)
	}
	go func() {
		_, _ = c.Write(data)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read back: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes back, want the %d sent, unchanged", len(got), len(data))
	}
}

func TestDelayProxyUpstreamDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	l.Close()
	addr := startDelay(t, dead, time.Millisecond)
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil || n != 0 {
		t.Fatalf("read from a proxy whose upstream is down: %d, %v; want the connection closed", n, err)
	}
}
