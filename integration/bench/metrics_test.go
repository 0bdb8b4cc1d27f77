package bench

import (
	"strings"
	"testing"
)

func TestParseMetric(t *testing.T) {
	page := `# HELP streamer_fetched_bytes_by_cause_total Compressed bytes.
# TYPE streamer_fetched_bytes_by_cause_total counter
streamer_fetched_bytes_by_cause_total{cause="background"} 9.8e+07
streamer_fetched_bytes_by_cause_total{cause="on_demand"} 1.048576e+06
streamer_fetched_bytes_by_cause_total{cause="prefetch"} 0
`
	tests := []struct {
		series string
		want   int64
		err    bool
	}{
		{`streamer_fetched_bytes_by_cause_total{cause="on_demand"}`, 1 << 20, false},
		{`streamer_fetched_bytes_by_cause_total{cause="background"}`, 98_000_000, false},
		{`streamer_fetched_bytes_by_cause_total{cause="prefetch"}`, 0, false},
		{`streamer_fetched_bytes_by_cause_total{cause="other"}`, -1, true},
		{`streamer_fetched_bytes_by_cause_total`, -1, true},
	}
	for _, tc := range tests {
		got, err := ParseMetric(strings.NewReader(page), tc.series)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseMetric(%s) = %d, %v; want %d, error %v", tc.series, got, err, tc.want, tc.err)
		}
	}
}
