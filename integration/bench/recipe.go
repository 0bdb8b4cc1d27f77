package bench

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// builderVersion changes whenever the way images are built changes, so
// every cached image is rebuilt.
const builderVersion = 1

// Recipe describes how to build one benchmark image and how to run it.
type Recipe struct {
	// Name is the image's repository in the benchmark registry.
	Name string
	// Debian is the base root filesystem; nil builds on busybox.
	Debian *DebianBase `json:",omitempty"`
	// Stages are the layers above the base, in order.
	Stages []Stage
	// DataBytes is the size of random data files in a "data" layer that
	// the workload never reads (0: none).
	DataBytes int64 `json:",omitempty"`
	// Command runs the service; "{port}" is replaced by its port.
	Command []string
	// ReadyPath answers 200 once the service is up (the readiness probe);
	// WorkPath is what the first requests after readiness ask for.
	ReadyPath, WorkPath string
}

// DebianBase is a debootstrap root filesystem.
type DebianBase struct {
	Suite, Variant, Mirror string
}

// Stage is one layer: Debian packages installed with apt, then files
// written. Build, when set, runs in a throwaway copy of the tree with
// BuildPackages installed, and the Outputs it makes are copied into the
// layer (e.g. javac without shipping the JDK).
type Stage struct {
	Name          string
	Packages      []string          `json:",omitempty"`
	Files         map[string]string `json:",omitempty"`
	BuildPackages []string          `json:",omitempty"`
	Build         string            `json:",omitempty"`
	Outputs       []string          `json:",omitempty"`
}

// Hash identifies the recipe's content: the image is rebuilt when it
// changes. Run-time settings (command, probe paths) are part of it too, to
// keep one rule.
func (r Recipe) Hash() string {
	b, err := json.Marshal(struct {
		V int
		R Recipe
	}{builderVersion, r})
	if err != nil {
		panic(fmt.Sprintf("encode recipe %s: %v", r.Name, err)) // plain data: cannot fail
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])[:16]
}

// BaseHash identifies the Debian base alone (shared by images).
func (d DebianBase) Hash() string {
	b, _ := json.Marshal(struct {
		V int
		D DebianBase
	}{builderVersion, d})
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])[:16]
}

// CommandFor is the service's command line for a port.
func (r Recipe) CommandFor(port int) []string {
	out := make([]string, len(r.Command))
	for i, a := range r.Command {
		out[i] = strings.ReplaceAll(a, "{port}", strconv.Itoa(port))
	}
	return out
}

// Bookworm is the Debian base of the runtime images.
var Bookworm = &DebianBase{Suite: "bookworm", Variant: "minbase", Mirror: "http://deb.debian.org/debian"}

const pythonServer = `import sys, time
t0 = time.time()
# The scientific stack a typical model-serving or analytics service loads.
import numpy as np
import scipy
import scipy.linalg, scipy.sparse, scipy.stats, scipy.signal, scipy.optimize, scipy.integrate
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/ready":
            body = b"ok\n"
        else:
            a = np.random.default_rng(7).random((128, 128))
            body = ("det=%g p=%g\n" % (scipy.linalg.det(a), scipy.stats.norm.cdf(0.5))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("ready after %.2fs" % (time.time() - t0), flush=True)
srv.serve_forever()
`

const javaServer = `import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.Executors;

public class Server {
    public static void main(String[] args) throws Exception {
        HttpServer s = HttpServer.create(new InetSocketAddress("127.0.0.1", Integer.parseInt(args[0])), 64);
        s.createContext("/ready", ex -> {
            byte[] b = "ok\n".getBytes(StandardCharsets.UTF_8);
            ex.sendResponseHeaders(200, b.length);
            ex.getResponseBody().write(b);
            ex.close();
        });
        s.createContext("/work", ex -> {
            StringBuilder sb = new StringBuilder();
            java.util.TreeMap<String, Integer> m = new java.util.TreeMap<>();
            for (int i = 0; i < 2000; i++) m.put(Integer.toHexString(i * 7919), i);
            sb.append(m.firstKey()).append(' ').append(java.time.Instant.now()).append('\n');
            byte[] b = sb.toString().getBytes(StandardCharsets.UTF_8);
            ex.sendResponseHeaders(200, b.length);
            ex.getResponseBody().write(b);
            ex.close();
        });
        s.setExecutor(Executors.newFixedThreadPool(4));
        s.start();
        System.out.println("ready");
    }
}
`

const nodeServer = `const express = require('express');
const app = express();
app.get('/ready', (req, res) => res.send('ok\n'));
app.get('/work', (req, res) => {
  const xs = [];
  for (let i = 0; i < 5000; i++) xs.push((i * 7919) % 1000);
  xs.sort((a, b) => a - b);
  res.json({ median: xs[xs.length >> 1], at: Date.now() });
});
app.listen(parseInt(process.argv[2], 10), '127.0.0.1', () => console.log('ready'));
`

// Recipes are the benchmark's images, by name.
func Recipes(dataBytes int64) map[string]Recipe {
	return map[string]Recipe{
		"python": {
			Name: "bench/python", Debian: Bookworm,
			Stages: []Stage{
				{Name: "runtime", Packages: []string{"python3"}},
				{Name: "libraries", Packages: []string{"python3-numpy", "python3-scipy"}},
				{Name: "app", Files: map[string]string{"app/server.py": pythonServer}},
			},
			Command:   []string{"/usr/bin/python3", "/app/server.py", "{port}"},
			ReadyPath: "/ready", WorkPath: "/work",
		},
		"java": {
			Name: "bench/java", Debian: Bookworm,
			Stages: []Stage{
				{Name: "runtime", Packages: []string{"openjdk-17-jre-headless"}},
				{Name: "app", Files: map[string]string{"app/src/Server.java": javaServer},
					BuildPackages: []string{"openjdk-17-jdk-headless"},
					Build:         "javac -d /app /app/src/Server.java", Outputs: []string{"app/Server.class"}},
			},
			Command:   []string{"/usr/bin/java", "-cp", "/app", "Server", "{port}"},
			ReadyPath: "/ready", WorkPath: "/work",
		},
		"node": {
			Name: "bench/node", Debian: Bookworm,
			Stages: []Stage{
				{Name: "runtime", Packages: []string{"nodejs"}},
				{Name: "libraries", Packages: []string{"node-express"}},
				{Name: "app", Files: map[string]string{"app/server.js": nodeServer}},
			},
			Command:   []string{"/usr/bin/node", "/app/server.js", "{port}"},
			ReadyPath: "/ready", WorkPath: "/work",
		},
		"data": {
			Name:      "bench/data",
			Stages:    []Stage{{Name: "app", Files: map[string]string{"www/index.html": "data service\n", "www/ready": "ok\n"}}},
			DataBytes: dataBytes,
			Command:   []string{"/bin/busybox", "httpd", "-f", "-p", "127.0.0.1:{port}", "-h", "/www"},
			ReadyPath: "/ready", WorkPath: "/index.html",
		},
	}
}

// QuickRecipe is the small image of the quick mode: busybox httpd and a
// 64 MiB file it never reads; no debootstrap needed.
func QuickRecipe() Recipe {
	r := Recipes(64 << 20)["data"]
	r.Name = "bench/web-small"
	return r
}
