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

func TestParseFUSEUse(t *testing.T) {
	page := `# TYPE streamer_fuse_operation_duration_seconds histogram
streamer_fuse_operation_duration_seconds_bucket{op="lookup",le="1e-05"} 3
streamer_fuse_operation_duration_seconds_sum{op="lookup"} 0.004
streamer_fuse_operation_duration_seconds_count{op="lookup"} 40
streamer_fuse_operation_duration_seconds_sum{op="read"} 0.25
streamer_fuse_operation_duration_seconds_count{op="read"} 7
streamer_fetch_request_duration_seconds_count 9
`
	before, err := ParseFUSEUse(strings.NewReader(page))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := before["lookup"], (FUSEUse{Count: 40, Seconds: 0.004}); got != want {
		t.Errorf("lookup %+v; want %+v", got, want)
	}
	if got, want := before["read"], (FUSEUse{Count: 7, Seconds: 0.25}); got != want {
		t.Errorf("read %+v; want %+v", got, want)
	}
	if len(before) != 2 {
		t.Errorf("parsed %v; want lookup and read only", before)
	}
	after := map[string]FUSEUse{"lookup": {40, 0.004}, "read": {10, 0.28}, "getattr": {2, 0.001}}
	d := fuseDelta(before, after)
	if len(d) != 2 || d["read"].Count != 3 || d["getattr"].Count != 2 {
		t.Errorf("delta %+v; want read 3 and getattr 2 (lookup unchanged, left out)", d)
	}
	if got := FmtFUSE(d); !strings.HasPrefix(got, "5 (read 3, getattr 2) in ") {
		t.Errorf("FmtFUSE = %q", got)
	}
	if got := FmtFUSE(map[string]FUSEUse{}); got != "0" {
		t.Errorf("FmtFUSE of nothing = %q", got)
	}
}

func TestParseFetchUse(t *testing.T) {
	page := `# TYPE streamer_fetch_requests_total counter
streamer_fetch_requests_total 120
streamer_fetch_request_duration_seconds_count 120
streamer_fetched_bytes_by_cause_total{cause="background"} 4.194304e+06
streamer_fetched_bytes_by_cause_total{cause="on_demand"} 65536
streamer_fetched_bytes_by_cause_total{cause="prefetch"} 1000
`
	before, err := ParseFetchUse(strings.NewReader(page))
	if err != nil {
		t.Fatal(err)
	}
	if before.Requests != 120 || before.Bytes["background"] != 4<<20 || before.Bytes["on_demand"] != 65536 || before.Bytes["prefetch"] != 1000 {
		t.Fatalf("parsed %+v", before)
	}
	after := &FetchUse{Requests: 123, Bytes: map[string]int64{"background": 8 << 20, "on_demand": 65536, "prefetch": 1000}}
	d := fetchDelta(before, after)
	if d.Requests != 3 || len(d.Bytes) != 1 || d.Bytes["background"] != 4<<20 {
		t.Errorf("delta %+v; want 3 requests, background 4 MiB only", d)
	}
	if got, want := FmtFetch(d), "3 (background 4.0 MiB)"; got != want {
		t.Errorf("FmtFetch = %q; want %q", got, want)
	}
	if got := FmtFetch(&FetchUse{}); got != "0" {
		t.Errorf("FmtFetch of nothing = %q", got)
	}
	if fetchDelta(nil, after) != nil {
		t.Error("a delta from an unknown page is not nil")
	}
	if _, err := ParseFetchUse(strings.NewReader("streamer_fetch_requests_total x\n")); err == nil {
		t.Error("a malformed value parsed")
	}
}
