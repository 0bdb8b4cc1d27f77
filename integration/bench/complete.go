package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// SnapshotterStatus is the part of streamer-snapshotter's GET /status (on
// its metrics address; `streamer status --output json` prints the same)
// that the completion poll reads.
type SnapshotterStatus struct {
	Layers []StatusLayer `json:"layers"`
	Images []StatusImage `json:"images"`
}

// StatusLayer is one mounted layer: Complete once every chunk is cached
// and the layer's tar matched its diffID; Bad when it did not.
type StatusLayer struct {
	Image        string        `json:"image"`
	Layer        digest.Digest `json:"layer"`
	Complete     bool          `json:"complete"`
	Bad          bool          `json:"bad,omitempty"`
	FetchedBytes int64         `json:"fetchedBytes"`
	// CompletedAt is when the layer became complete (older snapshotters
	// do not say).
	CompletedAt *time.Time `json:"completedAt,omitempty"`
}

// StatusImage is the snapshotter's decision for an image: how many of its
// layers it streams and how many it left to an ordinary pull.
type StatusImage struct {
	Image          string `json:"image"`
	StreamedLayers int    `json:"streamedLayers"`
	PulledLayers   int    `json:"pulledLayers"`
	Reason         string `json:"reason"`
}

// PulledImage is an image a run pulled: the reference it was pulled by and
// the digests of its layers (as in its manifest).
type PulledImage struct {
	Ref    string
	Layers []digest.Digest
}

// Incomplete lists the layers of images that are not complete yet
// according to st. A layer counts as complete when the snapshotter reports
// it complete; a layer it does not report counts as local only when the
// snapshotter says it left layers of that image to an ordinary pull (those
// are unpacked by the time PullImage returns). It fails when a layer
// failed its diffID check: that layer never completes.
func (st *SnapshotterStatus) Incomplete(images []PulledImage) ([]digest.Digest, error) {
	layers := map[digest.Digest]StatusLayer{}
	for _, l := range st.Layers {
		if old, ok := layers[l.Layer]; ok && (old.Complete || old.Bad) {
			continue
		}
		layers[l.Layer] = l
	}
	pulledNormally := map[string]bool{}
	for _, im := range st.Images {
		if im.PulledLayers > 0 {
			pulledNormally[im.Image] = true
		}
	}
	var pending []digest.Digest
	seen := map[digest.Digest]bool{}
	for _, im := range images {
		for _, d := range im.Layers {
			if seen[d] {
				continue
			}
			seen[d] = true
			l, ok := layers[d]
			switch {
			case ok && l.Bad:
				return nil, fmt.Errorf("layer %s of %s failed its diffID check", d, im.Ref)
			case ok && l.Complete:
			case !ok && pulledNormally[im.Ref]:
			default:
				pending = append(pending, d)
			}
		}
	}
	return pending, nil
}

// CompletedAt is when the last of the images' layers the snapshotter
// streams became complete, by its own clock; zero when one of them does
// not say.
func (st *SnapshotterStatus) CompletedAt(images []PulledImage) time.Time {
	at := map[digest.Digest]*time.Time{}
	for _, l := range st.Layers {
		if l.Complete {
			at[l.Layer] = l.CompletedAt
		}
	}
	var last time.Time
	for _, im := range images {
		for _, d := range im.Layers {
			t, ok := at[d]
			if !ok {
				continue // pulled normally: local when the pull returned
			}
			if t == nil {
				return time.Time{}
			}
			if t.After(last) {
				last = *t
			}
		}
	}
	return last
}

// CompletePoll waits until every layer of some images is complete.
type CompletePoll struct {
	// Status gets the snapshotter's status.
	Status func(ctx context.Context) (*SnapshotterStatus, error)
	// Images are the images whose layers must all be complete.
	Images []PulledImage
	// Interval between polls (100 ms if 0); Limit is the most Wait waits.
	Interval, Limit time.Duration
	// MaxErrors is how many status requests in a row may fail before Wait
	// gives up (10 if 0).
	MaxErrors int
}

// CompleteResult is the outcome of a CompletePoll.
type CompleteResult struct {
	// Complete says whether every layer was complete; At is when the
	// last layer became complete as the snapshotter reports it, else when
	// the poll saw it (the first poll that did).
	Complete bool
	At       time.Time
	// Why says why not, when Complete is false: the time limit, a layer
	// that failed verification, the status no longer answering.
	Why string
	// Pending are the layers not complete at the last poll that answered.
	Pending []digest.Digest
}

// Wait polls until every layer is complete, the limit passes, a layer
// fails verification, the status fails MaxErrors times in a row, or ctx
// ends. Only the end of ctx is an error: the other outcomes are results
// of the measurement, reported in Why.
func (p CompletePoll) Wait(ctx context.Context) (CompleteResult, error) {
	interval := p.Interval
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	maxErrors := p.MaxErrors
	if maxErrors <= 0 {
		maxErrors = 10
	}
	start := time.Now()
	deadline := start.Add(p.Limit)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	errs := 0
	var pending []digest.Digest
	for {
		st, err := p.Status(ctx)
		now := time.Now()
		if err != nil {
			if ctx.Err() != nil {
				return CompleteResult{}, fmt.Errorf("wait for every layer to be complete: %w", ctx.Err())
			}
			if errs++; errs >= maxErrors {
				return CompleteResult{Why: fmt.Sprintf("the snapshotter's status failed %d times in a row: %v", errs, err)}, nil
			}
		} else {
			errs = 0
			if pending, err = st.Incomplete(p.Images); err != nil {
				return CompleteResult{Why: err.Error()}, nil
			}
			if len(pending) == 0 {
				at := st.CompletedAt(p.Images)
				if at.IsZero() || at.After(now) {
					at = now
				}
				return CompleteResult{Complete: true, At: at}, nil
			}
		}
		if !now.Before(deadline) {
			why := fmt.Sprintf("the %v limit passed", p.Limit)
			if len(pending) > 0 {
				why += fmt.Sprintf(" with %d of %d layers left", len(pending), p.layers())
			}
			return CompleteResult{Why: why, Pending: pending}, nil
		}
		select {
		case <-ctx.Done():
			return CompleteResult{}, fmt.Errorf("wait for every layer to be complete: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// layers counts the distinct layers of p's images.
func (p CompletePoll) layers() int {
	seen := map[digest.Digest]bool{}
	for _, im := range p.Images {
		for _, d := range im.Layers {
			seen[d] = true
		}
	}
	return len(seen)
}

// ShortDigests prints digests as their first 12 hex digits, sorted.
func ShortDigests(ds []digest.Digest) string {
	s := make([]string, len(ds))
	for i, d := range ds {
		s[i] = d.Encoded()
		if len(s[i]) > 12 {
			s[i] = s[i][:12]
		}
	}
	sort.Strings(s)
	return strings.Join(s, ", ")
}

// FetchStatus gets GET /status from the snapshotter c reaches (see
// harness.UnixHTTPClient).
func FetchStatus(ctx context.Context, c *http.Client) (*SnapshotterStatus, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://snapshotter/status", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("get the snapshotter's status: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("read the snapshotter's status: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("get the snapshotter's status: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	var st SnapshotterStatus
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, fmt.Errorf("decode the snapshotter's status: %w", err)
	}
	return &st, nil
}
