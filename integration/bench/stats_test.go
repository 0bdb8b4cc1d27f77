package bench

import (
	"testing"
	"time"
)

func TestSummarize(t *testing.T) {
	tests := []struct {
		name string
		in   []float64
		want Summary
	}{
		{"empty", nil, Summary{}},
		{"one", []float64{3}, Summary{Median: 3, Min: 3, Max: 3, N: 1}},
		{"odd, unsorted", []float64{5, 1, 3}, Summary{Median: 3, Min: 1, Max: 5, N: 3}},
		{"even: mean of the middle two", []float64{4, 1, 2, 10}, Summary{Median: 3, Min: 1, Max: 10, N: 4}},
		{"duplicates", []float64{2, 2, 2, 9, 2}, Summary{Median: 2, Min: 2, Max: 9, N: 5}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := append([]float64(nil), tc.in...)
			if got := Summarize(tc.in); got != tc.want {
				t.Fatalf("Summarize(%v) = %+v, want %+v", tc.in, got, tc.want)
			}
			for i := range in {
				if in[i] != tc.in[i] {
					t.Fatalf("Summarize reordered its input: %v", tc.in)
				}
			}
		})
	}
}

func TestSummarizeDurationsAndMean(t *testing.T) {
	ds := []time.Duration{3 * time.Second, time.Second, 2 * time.Second}
	if got := SummarizeDurations(ds); got.Median != 2 || got.Min != 1 || got.Max != 3 {
		t.Fatalf("SummarizeDurations = %+v", got)
	}
	if got := Mean(ds); got != 2*time.Second {
		t.Fatalf("Mean = %v", got)
	}
	if got := Mean(nil); got != 0 {
		t.Fatalf("Mean(nil) = %v", got)
	}
}
