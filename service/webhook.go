package service

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/fetcher"
)

// MaxWebhookBody bounds a notification body.
const MaxWebhookBody = 1 << 20

// Envelope is the body of a distribution registry notification
// (application/vnd.docker.distribution.events.v1+json). Only the fields
// the service uses are decoded.
type Envelope struct {
	Events []Event `json:"events"`
}

// Event is one registry event.
type Event struct {
	ID        string    `json:"id"`
	Timestamp time.Time `json:"timestamp"`
	// Action is "push", "pull", "mount" or "delete".
	Action  string       `json:"action"`
	Target  EventTarget  `json:"target"`
	Request EventRequest `json:"request"`
}

// EventTarget is what an event is about.
type EventTarget struct {
	MediaType    string        `json:"mediaType"`
	ArtifactType string        `json:"artifactType,omitempty"`
	Digest       digest.Digest `json:"digest"`
	Size         int64         `json:"size"`
	Repository   string        `json:"repository"`
	Tag          string        `json:"tag,omitempty"`
}

// EventRequest is the request that caused an event.
type EventRequest struct {
	// Host is the registry host the client addressed (Host header).
	Host string `json:"host"`
}

// ParseEnvelope decodes a notification body: ErrInvalid when it is not
// JSON, has no "events" array, or exceeds MaxWebhookBody.
func ParseEnvelope(r io.Reader) (*Envelope, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxWebhookBody+1))
	if err != nil {
		return nil, fmt.Errorf("read notification: %w", err)
	}
	if len(b) > MaxWebhookBody {
		return nil, fmt.Errorf("notification: %w: body larger than %d bytes", ErrInvalid, MaxWebhookBody)
	}
	var raw struct {
		Events *[]Event `json:"events"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("notification: %w: %v", ErrInvalid, err)
	}
	if raw.Events == nil {
		return nil, fmt.Errorf("notification: %w: no events array", ErrInvalid)
	}
	return &Envelope{Events: *raw.Events}, nil
}

// manifestTypes are the media types a convertible image push has.
var manifestTypes = map[string]bool{
	ocispec.MediaTypeImageManifest:                              true,
	ocispec.MediaTypeImageIndex:                                 true,
	"application/vnd.docker.distribution.manifest.v2+json":      true,
	"application/vnd.docker.distribution.manifest.list.v2+json": true,
}

// EventDecision is what the service did with one event.
type EventDecision struct {
	EventID string `json:"eventID,omitempty"`
	// Image is "host/repo@digest" when the event named one.
	Image string `json:"image,omitempty"`
	// Operation is the id of the operation queued (empty when ignored).
	Operation string `json:"operation,omitempty"`
	// Ignored says why nothing was queued.
	Ignored string `json:"ignored,omitempty"`
}

// Screen decides from the event alone whether it may start a conversion,
// returning the image reference to convert or why it is ignored. host
// overrides the event's request.host when not empty.
func Screen(ev Event, host string) (fetcher.Ref, string) {
	t := ev.Target
	switch {
	case ev.Action != "push":
		return fetcher.Ref{}, "action " + ev.Action
	case !manifestTypes[t.MediaType]:
		return fetcher.Ref{}, "not an image manifest push"
	case t.ArtifactType == artifact.ArtifactType:
		return fetcher.Ref{}, "streaming artifact"
	case t.Tag == "":
		return fetcher.Ref{}, "pushed by digest"
	case strings.HasPrefix(t.Tag, "sha256-"):
		return fetcher.Ref{}, "referrers tag index"
	case t.Digest.Validate() != nil:
		return fetcher.Ref{}, "invalid digest"
	}
	if host == "" {
		host = ev.Request.Host
	}
	if host == "" {
		return fetcher.Ref{}, "no registry host"
	}
	name, err := NormalizeRepository(host + "/" + t.Repository)
	if err != nil {
		return fetcher.Ref{}, "invalid repository"
	}
	ref, err := fetcher.ParseRef(name + ":" + t.Tag)
	if err != nil {
		return fetcher.Ref{}, "invalid tag"
	}
	return ref.WithDigest(t.Digest), ""
}

// HandleEnvelope queues a conversion for every manifest pushed by tag into
// a repository with streaming enabled, unless the image already has an
// operation queued, running or succeeded, or the manifest is itself a
// referrer (a streaming artifact, a signature).
func (s *Service) HandleEnvelope(ctx context.Context, env *Envelope) []EventDecision {
	out := make([]EventDecision, 0, len(env.Events))
	for _, ev := range env.Events {
		d := EventDecision{EventID: ev.ID}
		ref, why := Screen(ev, s.cfg.RegistryHost)
		if why == "" {
			d.Image = imageKey(ref.Name(), ref.Digest)
			d.Operation, why = s.autoConvert(ctx, ref, ev.Target)
		}
		d.Ignored = why
		l := log.G(ctx).WithFields(log.Fields{"event": ev.ID, "action": ev.Action, "repository": ev.Target.Repository, "tag": ev.Target.Tag, "digest": ev.Target.Digest})
		if why != "" {
			l.WithField("reason", why).Debug("registry event ignored")
		} else {
			l.WithField("op", d.Operation).Info("registry push queued for conversion")
		}
		out = append(out, d)
	}
	return out
}

func (s *Service) autoConvert(ctx context.Context, ref fetcher.Ref, t EventTarget) (string, string) {
	repo, err := s.store.Repository(ref.Name())
	if err != nil {
		return "", "state error: " + err.Error()
	}
	if !repo.Streaming {
		return "", "streaming disabled for " + ref.Name()
	}
	desc := ocispec.Descriptor{MediaType: t.MediaType, Digest: t.Digest, Size: t.Size}
	if why := s.referrerManifest(ctx, ref, desc); why != "" {
		return "", why
	}
	op, created, err := s.enqueue(ctx, ref, desc, SourceWebhook, func(cur *Operation) bool {
		return cur.State.Active() || cur.State == Succeeded
	})
	switch {
	case err != nil:
		return "", "state error: " + err.Error()
	case !created:
		return "", fmt.Sprintf("duplicate of operation %s (%s)", op.ID, op.State)
	}
	return op.ID, ""
}

// referrerManifest fetches an image manifest and says why it is not an
// image to convert: a manifest with a subject (a streaming artifact, a
// signature) is a referrer. Indexes and unreadable manifests are left to
// the conversion, which reports real errors.
func (s *Service) referrerManifest(ctx context.Context, ref fetcher.Ref, desc ocispec.Descriptor) string {
	if fetcher.IsIndex(desc.MediaType) {
		return ""
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	b, err := s.cfg.Registry.FetchManifest(ctx, ref, desc)
	if err != nil {
		log.G(ctx).WithError(err).WithField("image", ref.String()).Warn("read pushed manifest; queued anyway")
		return ""
	}
	var m ocispec.Manifest
	if json.Unmarshal(b, &m) != nil {
		return ""
	}
	switch {
	case m.ArtifactType == artifact.ArtifactType:
		return "streaming artifact"
	case m.Subject != nil:
		return "referrer of " + m.Subject.Digest.String()
	}
	for _, l := range m.Layers {
		if l.MediaType == artifact.MediaTypeTOC {
			return "streaming artifact"
		}
	}
	return ""
}
