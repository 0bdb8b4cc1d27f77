package nodeconfig

import (
	"fmt"
	"strings"
)

// maxDiffCells bounds the line-matching table of Diff (lines of a times
// lines of b, after common head and tail are trimmed); past it the middle
// is shown as removed and added whole.
const maxDiffCells = 4 << 20

// Diff returns a unified diff (3 lines of context) turning a into b, with
// the file names aName and bName; "" when they are equal.
func Diff(aName, bName string, a, b []byte) string {
	x, y := splitLines(string(a)), splitLines(string(b))
	ops := diffLines(x, y)
	hunks := groupHunks(ops, 3)
	if len(hunks) == 0 {
		return ""
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "--- %s\n+++ %s\n", aName, bName)
	for _, h := range hunks {
		ai, an, bi, bn := 0, 0, 0, 0
		first := true
		for _, o := range h {
			if first {
				ai, bi = o.ai, o.bi
				first = false
			}
			switch o.kind {
			case ' ':
				an++
				bn++
			case '-':
				an++
			case '+':
				bn++
			}
		}
		fmt.Fprintf(&sb, "@@ -%s +%s @@\n", hunkRange(ai, an), hunkRange(bi, bn))
		for _, o := range h {
			sb.WriteByte(o.kind)
			sb.WriteString(o.text)
			sb.WriteByte('\n')
		}
	}
	return sb.String()
}

// hunkRange is the "start,count" of a hunk header (1-based; an empty range
// names the line before it).
func hunkRange(start, n int) string {
	if n == 0 {
		return fmt.Sprintf("%d,0", start)
	}
	if n == 1 {
		return fmt.Sprintf("%d", start+1)
	}
	return fmt.Sprintf("%d,%d", start+1, n)
}

func splitLines(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(strings.TrimSuffix(s, "\n"), "\n")
}

// op is one line of an edit script; ai and bi are the 0-based line
// numbers in a and b where it stands.
type op struct {
	kind   byte // ' ', '-', '+'
	text   string
	ai, bi int
}

// diffLines returns an edit script from x to y: a longest common
// subsequence of lines is kept.
func diffLines(x, y []string) []op {
	head := 0
	for head < len(x) && head < len(y) && x[head] == y[head] {
		head++
	}
	tail := 0
	for tail < len(x)-head && tail < len(y)-head && x[len(x)-1-tail] == y[len(y)-1-tail] {
		tail++
	}
	var ops []op
	for i := 0; i < head; i++ {
		ops = append(ops, op{' ', x[i], i, i})
	}
	mx, my := x[head:len(x)-tail], y[head:len(y)-tail]
	n, m := len(mx), len(my)
	if (n+1)*(m+1) > maxDiffCells {
		for i, s := range mx {
			ops = append(ops, op{'-', s, head + i, head})
		}
		for j, s := range my {
			ops = append(ops, op{'+', s, head + n, head + j})
		}
	} else {
		// lcs[i*(m+1)+j] is the LCS length of mx[i:] and my[j:].
		lcs := make([]int32, (n+1)*(m+1))
		for i := n - 1; i >= 0; i-- {
			for j := m - 1; j >= 0; j-- {
				if mx[i] == my[j] {
					lcs[i*(m+1)+j] = lcs[(i+1)*(m+1)+j+1] + 1
				} else {
					lcs[i*(m+1)+j] = max(lcs[(i+1)*(m+1)+j], lcs[i*(m+1)+j+1])
				}
			}
		}
		i, j := 0, 0
		for i < n || j < m {
			switch {
			case i < n && j < m && mx[i] == my[j]:
				ops = append(ops, op{' ', mx[i], head + i, head + j})
				i++
				j++
			case j < m && (i == n || lcs[i*(m+1)+j+1] >= lcs[(i+1)*(m+1)+j]):
				ops = append(ops, op{'+', my[j], head + i, head + j})
				j++
			default:
				ops = append(ops, op{'-', mx[i], head + i, head + j})
				i++
			}
		}
	}
	for k := 0; k < tail; k++ {
		ops = append(ops, op{' ', x[len(x)-tail+k], len(x) - tail + k, len(y) - tail + k})
	}
	return ops
}

// groupHunks cuts the script into hunks: changed lines with up to ctx
// unchanged lines around them, hunks closer than 2*ctx merged.
func groupHunks(ops []op, ctx int) [][]op {
	var hunks [][]op
	start, end := -1, -1 // current hunk: ops[start:end]
	for i, o := range ops {
		if o.kind == ' ' {
			continue
		}
		lo, hi := max(0, i-ctx), min(len(ops), i+ctx+1)
		if start >= 0 && lo <= end {
			end = max(end, hi)
			continue
		}
		if start >= 0 {
			hunks = append(hunks, ops[start:end])
		}
		start, end = lo, hi
	}
	if start >= 0 {
		hunks = append(hunks, ops[start:end])
	}
	return hunks
}
