package bench

import (
	"fmt"
	"html"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Mode is how a node gets an image.
type Mode string

// The modes compared.
const (
	// ModeFull is containerd's overlayfs snapshotter: the whole image is
	// downloaded and unpacked before the container starts.
	ModeFull Mode = "full pull"
	// ModeLazy is Streamer with background fetch on, as deployed.
	ModeLazy Mode = "streamer lazy"
	// ModePrefetch is Streamer with the image's prefetch list.
	ModePrefetch Mode = "streamer prefetch"
)

// Modes lists every mode in table order.
var Modes = []Mode{ModeFull, ModeLazy, ModePrefetch}

// Scenario names how many pods start at once.
type Scenario string

// ScenarioOne is one pod; ScenarioMix is three images at once; Pods(n) is n
// pods of one image.
const (
	ScenarioOne Scenario = "1 pod"
	ScenarioMix Scenario = "3 images at once"
)

// ScenarioPods is n pods of the same image started at once.
func ScenarioPods(n int) Scenario { return Scenario(fmt.Sprintf("%d pods", n)) }

// Run is one cold measurement of one cell.
type Run struct {
	// Pull is the PullImage call alone; Ready runs from the PullImage call
	// to the first 200 of the readiness probe (the slowest pod when several
	// start at once).
	Pull, Ready time.Duration
	// FirstRequests are the latencies of the first requests after
	// readiness (of every pod).
	FirstRequests []time.Duration
	// LinkBytes are the bytes that crossed the link from the registry
	// between the PullImage call and readiness.
	LinkBytes int64
	// StartupBytes are the bytes the snapshotter fetched on demand (file
	// reads) by readiness; -1 when not known (full pull).
	StartupBytes int64
	// Complete runs from the PullImage call until every layer of the
	// run's images (all of them when several start at once) is local: on
	// a full pull the PullImage call (the slowest one), since the layers
	// are unpacked when it returns; on Streamer until the snapshotter's
	// status reports every layer complete (every chunk cached and the
	// layer checked against its diffID), at the time the snapshotter
	// recorded for the last of them (its status is polled every 100 ms
	// once the first requests are done). 0 when not measured or not
	// reached (see NotComplete).
	Complete time.Duration
	// CompleteBytes crossed the link from the PullImage call until then.
	CompleteBytes int64
	// NotComplete says why the layers were not all complete: the time
	// limit passed, a layer failed verification.
	NotComplete string `json:",omitempty"`
	// RequestFUSE are the FUSE requests the snapshotter served while the
	// first requests ran, by operation (Streamer only): what of the
	// requests' latency went through the layer mounts.
	RequestFUSE map[string]FUSEUse `json:",omitempty"`
	// RequestFetch are the range requests the snapshotter completed while the
	// first requests ran and the compressed bytes it read by cause
	// (Streamer only): the background work that ran beside them.
	RequestFetch *FetchUse `json:",omitempty"`
	// RequestCPU is the CPU time the parts of the node used while the
	// first requests ran: what ran beside the pods.
	RequestCPU *CPUUse `json:",omitempty"`
}

// FUSEUse is a count of FUSE requests and the time spent serving them.
type FUSEUse struct {
	Count   int64
	Seconds float64
}

// FetchUse counts a snapshotter's range requests and the compressed bytes
// they read, by cause (on_demand, prefetch, background).
type FetchUse struct {
	Requests int64
	Bytes    map[string]int64 `json:",omitempty"`
}

// FmtFetch prints fetch use, causes in a fixed order: "3 (background
// 4.0 MiB, prefetch 64.0 KiB)".
func FmtFetch(u *FetchUse) string {
	var parts []string
	for _, cause := range []string{"on_demand", "prefetch", "background"} {
		if n := u.Bytes[cause]; n > 0 {
			parts = append(parts, strings.ReplaceAll(cause, "_", " ")+" "+FmtBytes(n))
		}
	}
	if len(parts) == 0 {
		return strconv.FormatInt(u.Requests, 10)
	}
	return fmt.Sprintf("%d (%s)", u.Requests, strings.Join(parts, ", "))
}

// FmtFUSE prints FUSE use by operation, most used first: "12 (lookup 8,
// read 4) in 1.2 ms".
func FmtFUSE(u map[string]FUSEUse) string {
	ops := make([]string, 0, len(u))
	var n int64
	var secs float64
	for op, x := range u {
		if x.Count > 0 {
			ops = append(ops, op)
			n += x.Count
			secs += x.Seconds
		}
	}
	if n == 0 {
		return "0"
	}
	sort.Slice(ops, func(i, j int) bool {
		if u[ops[i]].Count != u[ops[j]].Count {
			return u[ops[i]].Count > u[ops[j]].Count
		}
		return ops[i] < ops[j]
	})
	parts := make([]string, len(ops))
	for i, op := range ops {
		parts[i] = fmt.Sprintf("%s %d", op, u[op].Count)
	}
	return fmt.Sprintf("%d (%s) in %s", n, strings.Join(parts, ", "), FmtDuration(time.Duration(secs*float64(time.Second))))
}

// Cell is the runs of one image in one mode and scenario.
type Cell struct {
	Image    string
	Mode     Mode
	Scenario Scenario
	Runs     []Run
	// NA says why the cell has no runs (e.g. no prefetch list support).
	NA string
}

// Ready summarizes the ready times of the runs.
func (c Cell) Ready() Summary { return c.durations(func(r Run) time.Duration { return r.Ready }) }

// Pull summarizes the pull times of the runs.
func (c Cell) Pull() Summary { return c.durations(func(r Run) time.Duration { return r.Pull }) }

// FirstRequests summarizes, over runs, the mean latency of the first
// requests after readiness.
func (c Cell) FirstRequests() Summary {
	return c.durations(func(r Run) time.Duration { return Mean(r.FirstRequests) })
}

// LinkBytes summarizes the bytes over the link by readiness.
func (c Cell) LinkBytes() Summary {
	xs := make([]float64, 0, len(c.Runs))
	for _, r := range c.Runs {
		xs = append(xs, float64(r.LinkBytes))
	}
	return Summarize(xs)
}

// Complete summarizes the complete times of the runs that reached it;
// notComplete counts the runs that did not, why is the first one's
// reason.
func (c Cell) Complete() (s Summary, notComplete int, why string) {
	var ds []time.Duration
	for _, r := range c.Runs {
		switch {
		case r.NotComplete != "":
			if notComplete++; why == "" {
				why = r.NotComplete
			}
		case r.Complete > 0:
			ds = append(ds, r.Complete)
		}
	}
	return SummarizeDurations(ds), notComplete, why
}

// CompleteBytes summarizes the bytes over the link by complete, over the
// runs that reached it.
func (c Cell) CompleteBytes() Summary {
	var xs []float64
	for _, r := range c.Runs {
		if r.NotComplete == "" && r.Complete > 0 {
			xs = append(xs, float64(r.CompleteBytes))
		}
	}
	return Summarize(xs)
}

// fullPullTime is what a Streamer cell's complete time is compared with:
// the median time of the full pull cell's runs until the images were
// local (its pull time; runs recorded without a complete time count their
// pull).
func fullPullTime(full Cell) (time.Duration, bool) {
	var ds []time.Duration
	for _, r := range full.Runs {
		if r.Complete > 0 {
			ds = append(ds, r.Complete)
		} else if r.Pull > 0 {
			ds = append(ds, r.Pull)
		}
	}
	if len(ds) == 0 {
		return 0, false
	}
	return seconds(SummarizeDurations(ds).Median), true
}

// CompleteColumns are the "complete", "bytes by complete" and "complete /
// full pull" cells of c's row; full is the full pull cell of the same
// image and scenario (no runs if there is none). The ratio is left out
// when a run did not complete: its median would be unknown.
func CompleteColumns(c, full Cell) (complete, bytes, ratio string) {
	s, nc, why := c.Complete()
	switch {
	case s.N == 0 && nc == 0:
		return "n/a", "n/a", "n/a"
	case s.N == 0:
		return "not complete: " + why, "n/a", "n/a"
	}
	complete, bytes, ratio = fmtSummary(s), FmtBytes(int64(c.CompleteBytes().Median)), "n/a"
	if nc > 0 {
		complete += fmt.Sprintf("; %d of %d runs not complete: %s", nc, len(c.Runs), why)
		return complete, bytes, "n/a: not every run completed"
	}
	if f, ok := fullPullTime(full); ok && f > 0 {
		ratio = fmt.Sprintf("%.2fx", s.Median/f.Seconds())
	}
	return complete, bytes, ratio
}

// CompleteLine is the progress line on r's complete time, "" when it was
// not measured; full is the full pull cell to compare with (no runs if
// there is none yet).
func CompleteLine(r Run, m Mode, full Cell) string {
	switch {
	case r.NotComplete != "":
		return "layers NOT all complete: " + r.NotComplete
	case r.Complete <= 0:
		return ""
	case m == ModeFull:
		return fmt.Sprintf("complete %s (the pull: the layers are local when PullImage returns), %s over the link",
			FmtDuration(r.Complete), FmtBytes(r.CompleteBytes))
	}
	line := fmt.Sprintf("every layer complete and verified at %s, %s over the link", FmtDuration(r.Complete), FmtBytes(r.CompleteBytes))
	if f, ok := fullPullTime(full); ok && f > 0 {
		line += fmt.Sprintf("; %.2fx the full pull (%s)", r.Complete.Seconds()/f.Seconds(), FmtDuration(f))
	}
	return line
}

// StartupBytes is the median of the known on-demand byte counts, and
// whether there was one.
func (c Cell) StartupBytes() (int64, bool) {
	var xs []float64
	for _, r := range c.Runs {
		if r.StartupBytes >= 0 {
			xs = append(xs, float64(r.StartupBytes))
		}
	}
	if len(xs) == 0 {
		return 0, false
	}
	return int64(Summarize(xs).Median), true
}

func (c Cell) durations(f func(Run) time.Duration) Summary {
	ds := make([]time.Duration, 0, len(c.Runs))
	for _, r := range c.Runs {
		ds = append(ds, f(r))
	}
	return SummarizeDurations(ds)
}

// Report is the outcome of a benchmark: its cells and what the lower
// bounds are computed from.
type Report struct {
	// Machine and Profile describe where the figures come from.
	Machine string
	Profile Profile
	Date    time.Time
	Cells   []Cell
	// LocalStart is, per image, the runtime's own start cost: RunPodSandbox
	// excluded, CreateContainer to ready with the image fully local and the
	// page cache dropped.
	LocalStart map[string]time.Duration
	// StartupBytes is, per image, what the workload read at startup: the
	// snapshotter's on-demand bytes by readiness with background fetch off.
	StartupBytes map[string]int64
	// Notes are printed under the table.
	Notes []string
}

// cell finds a cell.
func (r *Report) cell(image string, m Mode, s Scenario) (Cell, bool) {
	for _, c := range r.Cells {
		if c.Image == image && c.Mode == m && c.Scenario == s {
			return c, true
		}
	}
	return Cell{}, false
}

// startupBytes is what image reads at startup: the on-demand bytes of its
// lazy single-pod cell, else of any Streamer cell of it.
func (r *Report) startupBytes(image string) (int64, bool) {
	if b, ok := r.StartupBytes[image]; ok && b >= 0 {
		return b, true
	}
	if c, ok := r.cell(image, ModeLazy, ScenarioOne); ok {
		if b, ok := c.StartupBytes(); ok {
			return b, true
		}
	}
	for _, c := range r.Cells {
		if c.Image == image && c.Mode != ModeFull {
			if b, ok := c.StartupBytes(); ok {
				return b, true
			}
		}
	}
	return 0, false
}

// LowerBound is the least time a cell's pods could take to be ready: the
// bytes the workload reads at startup over the link's rate, plus the
// runtime's start cost with a local image. Several images at once share the
// link, so their bytes add up. ok is false when either part is unknown.
func (r *Report) LowerBound(c Cell) (time.Duration, bool) {
	local, ok := r.LocalStart[c.Image]
	if !ok || r.Profile.RateBits <= 0 {
		return 0, false
	}
	var bytes int64
	images := []string{c.Image}
	if c.Scenario == ScenarioMix {
		images = nil
		for _, o := range r.Cells {
			if o.Scenario == ScenarioMix && o.Mode == c.Mode && !contains(images, o.Image) {
				images = append(images, o.Image)
			}
		}
	}
	for _, im := range images {
		b, ok := r.startupBytes(im)
		if !ok {
			return 0, false
		}
		bytes += b
	}
	return local + r.Profile.TransferTime(bytes), true
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// FmtDuration prints a duration for the table: milliseconds under a
// second, else seconds with two decimals.
func FmtDuration(d time.Duration) string {
	if d = d.Round(time.Millisecond); d < time.Second {
		return fmt.Sprintf("%d ms", d.Milliseconds())
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

// FmtBytes prints a byte count with a binary unit.
func FmtBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	default:
		return fmt.Sprintf("%d B", n)
	}
}

// fmtSummary prints "median (min-max)" of a duration summary.
func fmtSummary(s Summary) string {
	if s.N == 0 {
		return "n/a"
	}
	if s.N == 1 {
		return FmtDuration(seconds(s.Median))
	}
	return fmt.Sprintf("%s (%s–%s)", FmtDuration(seconds(s.Median)), FmtDuration(seconds(s.Min)), FmtDuration(seconds(s.Max)))
}

// sortedCells orders cells by scenario (one pod first), image, mode.
func (r *Report) sortedCells() []Cell {
	cells := append([]Cell(nil), r.Cells...)
	scen := func(s Scenario) int {
		switch {
		case s == ScenarioOne:
			return 0
		case s == ScenarioMix:
			return 2
		default:
			return 1
		}
	}
	mode := func(m Mode) int {
		for i, x := range Modes {
			if x == m {
				return i
			}
		}
		return len(Modes)
	}
	sort.SliceStable(cells, func(i, j int) bool {
		a, b := cells[i], cells[j]
		if scen(a.Scenario) != scen(b.Scenario) {
			return scen(a.Scenario) < scen(b.Scenario)
		}
		if a.Scenario != b.Scenario {
			return a.Scenario < b.Scenario
		}
		if a.Image != b.Image {
			return a.Image < b.Image
		}
		return mode(a.Mode) < mode(b.Mode)
	})
	return cells
}

// Markdown renders the report as a markdown table, one row per cell:
// medians with (min–max) over the runs.
func (r *Report) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Link profile **%s** (%s, %s round trip). %s.\n\n", r.Profile.Name, r.Profile.RateString(), r.Profile.RTT, r.Machine)
	b.WriteString("| image | scenario | mode | runs | pull | ready | first 10 requests (mean) | bytes by ready | lower bound | ready / full pull | complete | bytes by complete | complete / full pull |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, c := range r.sortedCells() {
		if c.NA != "" || len(c.Runs) == 0 {
			reason := c.NA
			if reason == "" {
				reason = "no runs"
			}
			fmt.Fprintf(&b, "| %s | %s | %s | 0 | n/a | n/a | n/a | n/a | n/a | n/a: %s | n/a | n/a | n/a |\n", c.Image, c.Scenario, c.Mode, reason)
			continue
		}
		ready := c.Ready()
		lb := "n/a"
		if d, ok := r.LowerBound(c); ok {
			lb = FmtDuration(d)
		}
		ratio := "n/a"
		full, ok := r.cell(c.Image, ModeFull, c.Scenario)
		if ok && len(full.Runs) > 0 {
			if f := full.Ready().Median; f > 0 {
				ratio = fmt.Sprintf("%.2fx", ready.Median/f)
			}
		}
		by := FmtBytes(int64(c.LinkBytes().Median))
		complete, completeBytes, completeRatio := CompleteColumns(c, full)
		fmt.Fprintf(&b, "| %s | %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			c.Image, c.Scenario, c.Mode, len(c.Runs), fmtSummary(c.Pull()), fmtSummary(ready),
			fmtSummary(c.FirstRequests()), by, lb, ratio, complete, completeBytes, completeRatio)
	}
	if len(r.LocalStart) > 0 {
		b.WriteString("\nRuntime start cost with the image fully local (page cache dropped), used in the lower bounds: ")
		var names []string
		for k := range r.LocalStart {
			names = append(names, k)
		}
		sort.Strings(names)
		for i, k := range names {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "%s %s", k, FmtDuration(r.LocalStart[k]))
		}
		b.WriteString(".\n")
	}
	if len(r.StartupBytes) > 0 {
		b.WriteString("\nBytes read at startup (on demand by readiness, background fetch off), used in the lower bounds: ")
		var names []string
		for k := range r.StartupBytes {
			names = append(names, k)
		}
		sort.Strings(names)
		for i, k := range names {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "%s %s", k, FmtBytes(r.StartupBytes[k]))
		}
		b.WriteString(".\n")
	}
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "\n%s\n", n)
	}
	return b.String()
}

// modeColors are the bar colors of the chart, by mode.
var modeColors = map[Mode]string{ModeFull: "#8c8c8c", ModeLazy: "#2b7bba", ModePrefetch: "#46a36b"}

// SVG renders a bar chart of the median ready time per image (groups) and
// mode (bars) for one scenario, with min–max whiskers and the lower bound
// as a dashed tick; cells without runs are left out.
func (r *Report) SVG(s Scenario) string {
	type bar struct {
		mode        Mode
		med, lo, hi float64
		lb          float64
	}
	var images []string
	bars := map[string][]bar{}
	maxV := 0.0
	for _, c := range r.sortedCells() {
		if c.Scenario != s || len(c.Runs) == 0 {
			continue
		}
		if !contains(images, c.Image) {
			images = append(images, c.Image)
		}
		rs := c.Ready()
		b := bar{mode: c.Mode, med: rs.Median, lo: rs.Min, hi: rs.Max, lb: -1}
		if d, ok := r.LowerBound(c); ok {
			b.lb = d.Seconds()
		}
		bars[c.Image] = append(bars[c.Image], b)
		maxV = math.Max(maxV, rs.Max)
	}
	const (
		left, top, bottom, right = 60.0, 40.0, 50.0, 20.0
		barW, gap, groupGap      = 28.0, 4.0, 30.0
		plotH                    = 260.0
	)
	nBars := 0
	for _, im := range images {
		nBars += len(bars[im])
	}
	width := math.Max(left+right+float64(nBars)*(barW+gap)+float64(len(images))*groupGap+140, 620)
	height := top + plotH + bottom
	scaleMax := niceCeil(maxV)
	y := func(v float64) float64 { return top + plotH - v/scaleMax*plotH }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="12">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%.0f" y="20" font-size="14">Time to pod readiness, %s — %s (%s, %s RTT)</text>`+"\n",
		left, html.EscapeString(string(s)), html.EscapeString(r.Profile.Name), r.Profile.RateString(), r.Profile.RTT)
	// Axis and grid: five ticks.
	for i := 0; i <= 5; i++ {
		v := scaleMax * float64(i) / 5
		fmt.Fprintf(&b, `<line x1="%.0f" x2="%.0f" y1="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", left, width-right-140, y(v), y(v))
		fmt.Fprintf(&b, `<text x="%.0f" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, y(v)+4, trimFloat(v)+" s")
	}
	x := left + groupGap/2
	for _, im := range images {
		gx := x
		for _, br := range bars[im] {
			color := modeColors[br.mode]
			if color == "" {
				color = "#999"
			}
			fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.0f" height="%.1f" fill="%s"><title>%s %s: %.2f s</title></rect>`+"\n",
				x, y(br.med), barW, top+plotH-y(br.med), color, html.EscapeString(im), br.mode, br.med)
			cx := x + barW/2
			fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="black"/>`+"\n", cx, cx, y(br.lo), y(br.hi))
			if br.lb >= 0 {
				fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#c0392b" stroke-width="2" stroke-dasharray="3,2"/>`+"\n", x-2, x+barW+2, y(br.lb), y(br.lb))
			}
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle" font-size="10">%s</text>`+"\n", cx, y(br.med)-4, trimFloat(br.med))
			x += barW + gap
		}
		fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" text-anchor="middle">%s</text>`+"\n", (gx+x-gap)/2, top+plotH+18, html.EscapeString(im))
		x += groupGap
	}
	// Legend.
	lx := width - right - 130
	for i, m := range Modes {
		ly := top + float64(i)*18
		fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="12" height="12" fill="%s"/><text x="%.0f" y="%.0f">%s</text>`+"\n", lx, ly, modeColors[m], lx+16, ly+10, m)
	}
	ly := top + float64(len(Modes))*18
	fmt.Fprintf(&b, `<line x1="%.0f" x2="%.0f" y1="%.0f" y2="%.0f" stroke="#c0392b" stroke-width="2" stroke-dasharray="3,2"/><text x="%.0f" y="%.0f">lower bound</text>`+"\n", lx, lx+12, ly+6, ly+6, lx+16, ly+10)
	fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" font-size="10">bars: median; whiskers: min–max</text>`+"\n", lx, ly+28)
	b.WriteString("</svg>\n")
	return b.String()
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten (at least 0.1).
func niceCeil(v float64) float64 {
	if v <= 0.1 {
		return 0.1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func trimFloat(v float64) string {
	s := fmt.Sprintf("%.2f", v)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	if s == "" {
		return "0"
	}
	return s
}
