// Package bench is the readiness benchmark: it builds realistic images
// (Debian root filesystems cut into layers, or busybox plus data), serves
// them from a registry in a network namespace behind a shaped link, and
// measures the time from kubelet's PullImage call to the first 200 of the
// readiness probe, with containerd's overlayfs full pull against Streamer's
// lazy pull. integration/cmd/bench is its command; docs/benchmarks.md holds
// the figures.
package bench

import (
	"sort"
	"time"
)

// Summary is the median, minimum and maximum of a sample.
type Summary struct {
	Median, Min, Max float64
	N                int
}

// Summarize computes the summary of xs; an empty sample gives N == 0.
// The median of an even count is the mean of the two middle values.
func Summarize(xs []float64) Summary {
	if len(xs) == 0 {
		return Summary{}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return Summary{Median: m, Min: s[0], Max: s[len(s)-1], N: len(s)}
}

// SummarizeDurations is Summarize over durations, in seconds.
func SummarizeDurations(ds []time.Duration) Summary {
	xs := make([]float64, len(ds))
	for i, d := range ds {
		xs[i] = d.Seconds()
	}
	return Summarize(xs)
}

// Mean is the arithmetic mean of ds (0 for none).
func Mean(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return sum / time.Duration(len(ds))
}

// seconds turns a float of seconds back into a duration.
func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
