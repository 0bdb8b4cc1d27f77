package nodeconfig

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDiff(t *testing.T) {
	lines := func(n int, f func(i int) string) string {
		var b strings.Builder
		for i := 0; i < n; i++ {
			b.WriteString(f(i) + "\n")
		}
		return b.String()
	}
	tests := []struct {
		name, a, b string
		hunks      int
	}{
		{"equal", "x\ny\n", "x\ny\n", 0},
		{"from nothing", "", "a\nb\n", 1},
		{"to nothing", "a\nb\n", "", 1},
		{"one change in the middle", "1\n2\n3\n4\n5\n6\n7\n8\n9\n", "1\n2\n3\n4\nfive\n6\n7\n8\n9\n", 1},
		{"two distant changes", lines(40, func(i int) string { return "l" + string(rune('a'+i%26)) }),
			lines(40, func(i int) string {
				if i == 2 || i == 35 {
					return "changed"
				}
				return "l" + string(rune('a'+i%26))
			}), 2},
		{"no final newline", "a\nb", "a\nc", 1},
		{"reordered", "a\nb\nc\nd\n", "d\nc\nb\na\n", 1},
		{"apply output", v2Full, "", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := tt.b
			if tt.name == "apply output" {
				out, _, err := Apply([]byte(tt.a), Options{Address: sock})
				if err != nil {
					t.Fatal(err)
				}
				b = string(out)
			}
			d := Diff("a/f", "b/f", []byte(tt.a), []byte(b))
			if tt.hunks == 0 {
				if d != "" {
					t.Fatalf("diff of equal inputs:\n%s", d)
				}
				return
			}
			if n := strings.Count(d, "\n@@ "); n != tt.hunks {
				t.Errorf("%d hunks, want %d:\n%s", n, tt.hunks, d)
			}
			// The real patch(1) must turn a into b with it.
			assertPatches(t, tt.a, b, d)
		})
	}
}

func assertPatches(t *testing.T, a, b, d string) {
	t.Helper()
	if _, err := exec.LookPath("patch"); err != nil {
		t.Skip("SKIPPED: patch(1) is not installed; the diff is not checked by applying it")
	}
	dir := t.TempDir()
	f := filepath.Join(dir, "f")
	// patch compares whole lines: give both sides a final newline.
	norm := func(s string) string {
		if s != "" && !strings.HasSuffix(s, "\n") {
			return s + "\n"
		}
		return s
	}
	if err := os.WriteFile(f, []byte(norm(a)), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "patch", "--force", "--quiet", "--posix", f)
	cmd.Stdin = strings.NewReader(d)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("patch rejects the diff: %v\n%s\ndiff:\n%s", err, out, d)
	}
	got, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != norm(b) {
		t.Errorf("patched file:\n%s\nwant:\n%s\ndiff:\n%s", got, norm(b), d)
	}
}
