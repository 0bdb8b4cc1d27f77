package bench

import (
	"encoding/xml"
	"io"
	"strings"
	"testing"
	"time"
)

func sampleReport() *Report {
	run := func(pull, ready time.Duration, bytes int64) Run {
		return Run{Pull: pull, Ready: ready, LinkBytes: bytes, StartupBytes: -1,
			FirstRequests: []time.Duration{2 * time.Millisecond, 4 * time.Millisecond}}
	}
	// Full pulls are complete when pulled; the lazy runs some seconds
	// after readiness.
	full := func(pull, ready time.Duration, bytes int64) Run {
		r := run(pull, ready, bytes)
		r.Complete, r.CompleteBytes = pull, bytes
		return r
	}
	lazy := func(pull, ready, complete time.Duration, bytes int64) Run {
		r := run(pull, ready, bytes)
		r.Complete, r.CompleteBytes = complete, 310<<20
		return r
	}
	return &Report{
		Machine: "test machine",
		Profile: Profiles["cross-region"],
		Cells: []Cell{
			{Image: "python", Mode: ModeLazy, Scenario: ScenarioOne, Runs: []Run{lazy(time.Second/5, 2*time.Second, 10*time.Second, 50<<20), lazy(time.Second/5, 4*time.Second, 12*time.Second, 50<<20), lazy(time.Second/5, 3*time.Second, 11*time.Second, 50<<20)}},
			{Image: "python", Mode: ModeFull, Scenario: ScenarioOne, Runs: []Run{full(9*time.Second, 10*time.Second, 300<<20), full(11*time.Second, 12*time.Second, 300<<20)}},
			{Image: "python", Mode: ModePrefetch, Scenario: ScenarioOne, NA: "no list"},
			{Image: "python", Mode: ModeFull, Scenario: ScenarioPods(5), Runs: []Run{full(11*time.Second, 13*time.Second, 300<<20)}},
			{Image: "python", Mode: ModeLazy, Scenario: ScenarioPods(5), Runs: []Run{lazy(time.Second, 5*time.Second, 14*time.Second, 60<<20),
				{Pull: time.Second, Ready: 6 * time.Second, StartupBytes: -1, NotComplete: "the 10m0s limit passed with 1 of 4 layers left"}}},
		},
		LocalStart:   map[string]time.Duration{"python": time.Second},
		StartupBytes: map[string]int64{"python": 25 << 20},
	}
}

func TestLowerBound(t *testing.T) {
	r := sampleReport()
	c, _ := r.cell("python", ModeFull, ScenarioOne)
	got, ok := r.LowerBound(c)
	// 25 MiB at 200 Mbit/s is 1.048576 s, plus 1 s of local start.
	want := time.Second + time.Duration(25<<20*8*5) // ns per bit at 200 Mbit/s is 5
	if !ok || got != want {
		t.Fatalf("LowerBound = %v, %v; want %v", got, ok, want)
	}
	delete(r.LocalStart, "python")
	if _, ok := r.LowerBound(c); ok {
		t.Fatal("LowerBound without a local start cost should be unknown")
	}
}

func TestLowerBoundMixAddsBytes(t *testing.T) {
	r := &Report{
		Profile:      Profile{Name: "x", RateBits: 8_000_000}, // 1 MB/s
		LocalStart:   map[string]time.Duration{"a": time.Second, "b": 2 * time.Second},
		StartupBytes: map[string]int64{"a": 1_000_000, "b": 3_000_000},
		Cells: []Cell{
			{Image: "a", Mode: ModeLazy, Scenario: ScenarioMix, Runs: []Run{{Ready: time.Second}}},
			{Image: "b", Mode: ModeLazy, Scenario: ScenarioMix, Runs: []Run{{Ready: time.Second}}},
		},
	}
	got, ok := r.LowerBound(r.Cells[0])
	if want := 5 * time.Second; !ok || got != want {
		t.Fatalf("LowerBound of a in the mix = %v, %v; want %v (4 MB shared link + 1 s)", got, ok, want)
	}
}

func TestMarkdown(t *testing.T) {
	md := sampleReport().Markdown()
	for _, want := range []string{
		"| image | scenario | mode | runs | pull | ready | first 10 requests (mean) | bytes by ready | lower bound | ready / full pull | complete | bytes by complete | complete / full pull |",
		"| python | 1 pod | full pull | 2 | 10.00 s (9.00 s–11.00 s) | 11.00 s (10.00 s–12.00 s) | 3 ms (3 ms–3 ms) | 300.0 MiB | 2.05 s | 1.00x | 10.00 s (9.00 s–11.00 s) | 300.0 MiB | 1.00x |",
		"| python | 1 pod | streamer lazy | 3 | 200 ms (200 ms–200 ms) | 3.00 s (2.00 s–4.00 s) | 3 ms (3 ms–3 ms) | 50.0 MiB | 2.05 s | 0.27x | 11.00 s (10.00 s–12.00 s) | 310.0 MiB | 1.10x |",
		"| python | 1 pod | streamer prefetch | 0 | n/a | n/a | n/a | n/a | n/a | n/a: no list | n/a | n/a | n/a |",
		"| python | 5 pods | full pull | 1 | 11.00 s | 13.00 s |",
		"| 14.00 s; 1 of 2 runs not complete: the 10m0s limit passed with 1 of 4 layers left | 310.0 MiB | n/a: not every run completed |",
		"cross-region** (200 Mbit/s, 40ms round trip)",
		"python 1.00 s", "python 25.0 MiB",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	// One pod rows come first, full pull before lazy.
	if i, j := strings.Index(md, "| 1 pod | full pull"), strings.Index(md, "| 5 pods |"); i < 0 || j < i {
		t.Errorf("rows out of order:\n%s", md)
	}
	if i, j := strings.Index(md, "| 1 pod | full pull"), strings.Index(md, "| 1 pod | streamer lazy"); j < i {
		t.Errorf("modes out of order:\n%s", md)
	}
}

func TestSVG(t *testing.T) {
	svg := sampleReport().SVG(ScenarioOne)
	// Well-formed XML.
	d := xml.NewDecoder(strings.NewReader(svg))
	rects := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed: %v\n%s", err, svg)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "rect" {
			for _, a := range se.Attr {
				if a.Name.Local == "fill" && (a.Value == modeColors[ModeFull] || a.Value == modeColors[ModeLazy]) {
					rects++
				}
			}
		}
	}
	// Two bars (full, lazy; the n/a prefetch cell has none) plus two
	// legend swatches of those colors.
	if rects != 4 {
		t.Errorf("%d bars and swatches of the full/lazy colors, want 4:\n%s", rects, svg)
	}
	for _, want := range []string{"python: ", "python streamer lazy: 3.00 s", "lower bound", "1 pod"} {
		if !strings.Contains(svg, want) && !strings.Contains(svg, strings.TrimSuffix(want, ": ")) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	if strings.Contains(sampleReport().SVG(ScenarioMix), "<title>") {
		t.Error("SVG of a scenario without cells has bars")
	}
}

func TestNiceCeil(t *testing.T) {
	for _, tc := range []struct{ in, want float64 }{{0, 0.1}, {0.7, 1}, {1, 1}, {1.2, 2}, {3, 5}, {7, 10}, {12.5, 20}, {51, 100}} {
		if got := niceCeil(tc.in); got != tc.want {
			t.Errorf("niceCeil(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestFormat(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{{1500 * time.Microsecond, "2 ms"}, {999 * time.Millisecond, "999 ms"}, {999600 * time.Microsecond, "1.00 s"}, {1234 * time.Millisecond, "1.23 s"}} {
		if got := FmtDuration(tc.d); got != tc.want {
			t.Errorf("FmtDuration(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
	for _, tc := range []struct {
		n    int64
		want string
	}{{12, "12 B"}, {2048, "2.0 KiB"}, {5 << 20, "5.0 MiB"}, {3 << 30, "3.00 GiB"}} {
		if got := FmtBytes(tc.n); got != tc.want {
			t.Errorf("FmtBytes(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

func TestCompleteColumns(t *testing.T) {
	full := Cell{Mode: ModeFull, Runs: []Run{{Pull: 9 * time.Second, Complete: 9 * time.Second, CompleteBytes: 300 << 20}, {Pull: 11 * time.Second, Complete: 11 * time.Second, CompleteBytes: 300 << 20}}}
	// Full pull runs recorded before complete was measured compare by
	// their pull time.
	oldFull := Cell{Mode: ModeFull, Runs: []Run{{Pull: 8 * time.Second}}}
	done := func(d time.Duration) Run { return Run{Complete: d, CompleteBytes: 100 << 20} }
	notDone := Run{NotComplete: "the 10m0s limit passed with 2 of 3 layers left"}
	tests := []struct {
		name                   string
		c, full                Cell
		complete, bytes, ratio string
	}{
		{"full pull against itself", full, full, "10.00 s (9.00 s–11.00 s)", "300.0 MiB", "1.00x"},
		{"streamer within 1.1x", Cell{Runs: []Run{done(10500 * time.Millisecond), done(11 * time.Second)}}, full,
			"10.75 s (10.50 s–11.00 s)", "100.0 MiB", "1.07x"},
		{"against an older full pull's pull time", Cell{Runs: []Run{done(12 * time.Second)}}, oldFull, "12.00 s", "100.0 MiB", "1.50x"},
		{"no full pull cell", Cell{Runs: []Run{done(999600 * time.Microsecond)}}, Cell{}, "1.00 s", "100.0 MiB", "n/a"},
		{"not measured (probe, older results)", Cell{Runs: []Run{{Ready: time.Second}}}, full, "n/a", "n/a", "n/a"},
		{"no run completed", Cell{Runs: []Run{notDone, notDone}}, full,
			"not complete: the 10m0s limit passed with 2 of 3 layers left", "n/a", "n/a"},
		{"some runs did not complete", Cell{Runs: []Run{done(20 * time.Second), notDone}}, full,
			"20.00 s; 1 of 2 runs not complete: the 10m0s limit passed with 2 of 3 layers left", "100.0 MiB", "n/a: not every run completed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			complete, bytes, ratio := CompleteColumns(tc.c, tc.full)
			if complete != tc.complete || bytes != tc.bytes || ratio != tc.ratio {
				t.Errorf("CompleteColumns = %q, %q, %q; want %q, %q, %q", complete, bytes, ratio, tc.complete, tc.bytes, tc.ratio)
			}
		})
	}
}

func TestCompleteLine(t *testing.T) {
	full := Cell{Mode: ModeFull, Runs: []Run{{Pull: 10 * time.Second, Complete: 10 * time.Second}}}
	tests := []struct {
		name string
		r    Run
		m    Mode
		full Cell
		want string
	}{
		{"full pull", Run{Pull: 10 * time.Second, Complete: 10 * time.Second, CompleteBytes: 300 << 20}, ModeFull, Cell{},
			"complete 10.00 s (the pull: the layers are local when PullImage returns), 300.0 MiB over the link"},
		{"streamer against the full pull", Run{Complete: 10500 * time.Millisecond, CompleteBytes: 310 << 20}, ModeLazy, full,
			"every layer complete and verified at 10.50 s, 310.0 MiB over the link; 1.05x the full pull (10.00 s)"},
		{"streamer without a full pull cell", Run{Complete: 900 * time.Millisecond, CompleteBytes: 1 << 20}, ModePrefetch, Cell{},
			"every layer complete and verified at 900 ms, 1.0 MiB over the link"},
		{"not complete", Run{NotComplete: "the 10m0s limit passed with 1 of 4 layers left"}, ModeLazy, full,
			"layers NOT all complete: the 10m0s limit passed with 1 of 4 layers left"},
		{"not measured", Run{Ready: time.Second}, ModeLazy, full, ""},
	}
	for _, tc := range tests {
		if got := CompleteLine(tc.r, tc.m, tc.full); got != tc.want {
			t.Errorf("%s: CompleteLine = %q, want %q", tc.name, got, tc.want)
		}
	}
}
