// Package service is Streamer's conversion service: conversions run as
// durable operations (queued, running, succeeded, failed, canceled) on a
// worker pool, can be shown and cancelled over an HTTP API, and are started
// automatically from a registry's push notifications for repositories with
// streaming enabled. State lives in a bbolt database so it survives restarts.
package service

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"github.com/opencontainers/go-digest"
)

// Error kinds callers branch on (errors.Is); the HTTP API maps them to status
// codes and Client maps status codes back to them.
var (
	// ErrNotFound: no such operation, image or artifact.
	ErrNotFound = errors.New("not found")
	// ErrInvalid: a malformed request (image reference, repository name,
	// body).
	ErrInvalid = errors.New("invalid request")
	// ErrUnauthorized: missing or wrong token or webhook secret.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrConflict: the operation is already finished (cancel).
	ErrConflict = errors.New("conflict")
	// ErrUnavailable: the registry could not be reached.
	ErrUnavailable = errors.New("registry unavailable")
)

// State is where an operation is in its life.
type State string

// Operation states. queued -> running -> succeeded | failed | canceled, and
// queued -> canceled. A running operation found after a restart goes back
// to queued.
const (
	Queued    State = "queued"
	Running   State = "running"
	Succeeded State = "succeeded"
	Failed    State = "failed"
	Canceled  State = "canceled"
)

// Terminal reports whether s is a final state.
func (s State) Terminal() bool { return s == Succeeded || s == Failed || s == Canceled }

// Active reports whether s is queued or running.
func (s State) Active() bool { return s == Queued || s == Running }

// transitions lists the legal state changes.
var transitions = map[State][]State{
	Queued:  {Running, Canceled},
	Running: {Succeeded, Failed, Canceled, Queued},
}

// CanMove reports whether an operation may go from s to next.
func (s State) CanMove(next State) bool {
	for _, n := range transitions[s] {
		if n == next {
			return true
		}
	}
	return false
}

// Source says who started an operation.
const (
	SourceAPI     = "api"
	SourceWebhook = "webhook"
)

// LayerProgress is how far one layer's conversion is.
type LayerProgress struct {
	Platform string        `json:"platform,omitempty"`
	Index    int           `json:"index"`
	Count    int           `json:"count"`
	Layer    digest.Digest `json:"layer"`
	// Size is the original (compressed) layer size, Bytes how much of it
	// has been read.
	Size  int64 `json:"size"`
	Bytes int64 `json:"bytes"`
	// Done is true once the layer's blob and TOC are in the registry;
	// Reused when an earlier conversion was reused.
	Done   bool `json:"done"`
	Reused bool `json:"reused,omitempty"`
}

// Result is one platform's streaming artifact.
type Result struct {
	Platform string        `json:"platform,omitempty"`
	Subject  digest.Digest `json:"subject"`
	Artifact digest.Digest `json:"artifact"`
	// Existing is true when the artifact was already there.
	Existing bool `json:"existing"`
}

// Operation is one conversion of one image manifest (all its platforms).
type Operation struct {
	// ID is random and URL-safe.
	ID string `json:"id"`
	// Image is the reference as requested ("host/repo:tag" or
	// "host/repo@digest"); Repository is "host/repo".
	Image      string `json:"image"`
	Repository string `json:"repository"`
	// Digest and MediaType identify the manifest converted: the tag was
	// resolved when the operation was created.
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType,omitempty"`
	// Source is "api" or "webhook".
	Source string `json:"source"`
	State  State  `json:"state"`
	// Attempts counts starts (more than one after a restart).
	Attempts int `json:"attempts"`
	// Error says why the operation failed.
	Error string `json:"error,omitempty"`
	// CancelRequested is set when a cancel reached a running conversion.
	CancelRequested bool            `json:"cancelRequested,omitempty"`
	Created         time.Time       `json:"created"`
	Started         *time.Time      `json:"started,omitempty"`
	Finished        *time.Time      `json:"finished,omitempty"`
	Updated         time.Time       `json:"updated"`
	Layers          []LayerProgress `json:"layers,omitempty"`
	// Results holds each platform's artifact once succeeded; Artifact is
	// the first one's digest (the only one for a single-platform image).
	Results  []Result      `json:"results,omitempty"`
	Artifact digest.Digest `json:"artifact,omitempty"`
}

// ImageKey is "host/repo@digest", the identity of what an operation
// converts.
func (o *Operation) ImageKey() string { return imageKey(o.Repository, o.Digest) }

func imageKey(repo string, d digest.Digest) string { return repo + "@" + d.String() }

// BytesDone and BytesTotal sum the layers' progress.
func (o *Operation) BytesDone() (done, total int64) {
	for _, l := range o.Layers {
		done += l.Bytes
		total += l.Size
	}
	return done, total
}

// move changes the state, checking the transition and stamping times.
func (o *Operation) move(next State, now time.Time) error {
	if !o.State.CanMove(next) {
		return fmt.Errorf("operation %s is %s, cannot become %s: %w", o.ID, o.State, next, ErrConflict)
	}
	o.State = next
	o.Updated = now
	switch {
	case next == Running:
		o.Started = &now
		o.Attempts++
		o.Error = ""
	case next == Queued:
		o.Started = nil
	case next.Terminal():
		o.Finished = &now
	}
	return nil
}

func (o *Operation) clone() *Operation {
	c := *o
	c.Layers = append([]LayerProgress(nil), o.Layers...)
	c.Results = append([]Result(nil), o.Results...)
	return &c
}

// newID returns 16 random bytes, base64url without padding (22 characters).
func newID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("operation id: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b[:]), nil
}

// Repository is a repository's streaming setting.
type Repository struct {
	// Name is "host/repo" (normalized).
	Name string `json:"name"`
	// Streaming is true when new pushes are converted automatically.
	Streaming bool      `json:"streaming"`
	Updated   time.Time `json:"updated,omitempty"`
	// Images lists the images of the repository converted by the service
	// (filled by the API, not stored).
	Images []ConvertedImage `json:"images,omitempty"`
}

// ConvertedImage is an image the service converted.
type ConvertedImage struct {
	Image     string        `json:"image"`
	Digest    digest.Digest `json:"digest"`
	Artifact  digest.Digest `json:"artifact"`
	Operation string        `json:"operation"`
	Finished  time.Time     `json:"finished"`
}

// timeNow is the clock, UTC.
func timeNow() time.Time { return time.Now().UTC() }
