package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRecordWindowKey(t *testing.T) {
	if got := DefaultDaemon().Fetch.RecordWindow; got != Duration(2*time.Minute) {
		t.Errorf("default fetch.record_window %s, want 2m", got)
	}
	tests := []struct {
		name, toml string
		want       Duration
		err        string
	}{
		{"set", "[fetch]\nrecord_window = \"30s\"\n", Duration(30 * time.Second), ""},
		{"off", "[fetch]\nrecord_window = \"0s\"\n", 0, ""},
		{"negative", "[fetch]\nrecord_window = \"-1s\"\n", 0, "fetch.record_window:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.toml")
			if err := os.WriteFile(p, []byte(tt.toml), 0o644); err != nil {
				t.Fatal(err)
			}
			d, err := LoadDaemon(p)
			if err == nil {
				err = d.Validate()
			}
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want one naming %s", err, tt.err)
				}
				return
			}
			if err != nil || d.Fetch.RecordWindow != tt.want {
				t.Fatalf("record_window %s (%v), want %s", d.Fetch.RecordWindow, err, tt.want)
			}
		})
	}
}
