package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// DelayProxy is a TCP proxy that delays every byte by the same time in each
// direction without limiting throughput: a delay line, the user-space
// stand-in for netem (which this kernel lacks). It runs inside the
// registry's network namespace, in front of the registry.
type DelayProxy struct {
	// Upstream is the "host:port" connections are forwarded to.
	Upstream string
	// OneWay is the delay added to each direction (half the round trip).
	OneWay time.Duration
}

// chunkPool recycles the read buffers of the delay line.
var chunkPool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// Serve accepts connections on l until ctx ends, then closes l and every
// connection and waits for their goroutines.
func (p DelayProxy) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	go func() { <-ctx.Done(); l.Close() }()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("delay proxy accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.handle(ctx, c)
		}()
	}
}

func (p DelayProxy) handle(ctx context.Context, down net.Conn) {
	defer down.Close()
	var d net.Dialer
	up, err := d.DialContext(ctx, "tcp", p.Upstream)
	if err != nil {
		return
	}
	defer up.Close()
	stop := context.AfterFunc(ctx, func() { down.Close(); up.Close() })
	defer stop()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); delayCopy(up, down, p.OneWay) }()
	go func() { defer wg.Done(); delayCopy(down, up, p.OneWay) }()
	wg.Wait()
}

type chunk struct {
	buf *[]byte
	n   int
	at  time.Time
}

// delayCopy copies src to dst, each read written d after it arrived. A
// reader goroutine timestamps reads into a queue so the delay does not cut
// the throughput; when src ends, dst's write side is closed.
func delayCopy(dst, src net.Conn, d time.Duration) {
	q := make(chan chunk, 4096)
	go func() {
		defer close(q)
		for {
			bp := chunkPool.Get().(*[]byte)
			n, err := src.Read(*bp)
			if n > 0 {
				q <- chunk{buf: bp, n: n, at: time.Now().Add(d)}
			} else {
				chunkPool.Put(bp)
			}
			if err != nil {
				return
			}
		}
	}()
	failed := false
	for c := range q {
		if !failed {
			if w := time.Until(c.at); w > 0 {
				time.Sleep(w)
			}
			if _, err := dst.Write((*c.buf)[:c.n]); err != nil {
				failed = true
				src.Close() // stops the reader; the queue drains below
			}
		}
		chunkPool.Put(c.buf)
	}
	if tc, ok := dst.(interface{ CloseWrite() error }); ok && !failed {
		_ = tc.CloseWrite()
	} else {
		dst.Close()
	}
}

// ListenAndServeDelay listens on addr and serves p until ctx ends.
func ListenAndServeDelay(ctx context.Context, addr string, p DelayProxy) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("delay proxy listen on %s: %w", addr, err)
	}
	err = p.Serve(ctx, l)
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}
