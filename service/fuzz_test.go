package service

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/streamer-dev/streamer/fetcher"
)

// FuzzWebhook: whatever a registry (or anyone reaching the endpoint) posts
// as a notification, decoding and screening it return an error or a
// decision, never panic; an event let through names a valid image
// reference pinned by a valid digest.
func FuzzWebhook(f *testing.F) {
	digest := "sha256:" + strings.Repeat("a", 64)
	f.Add([]byte(`{"events":[{"id":"1","action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"`+digest+`","repository":"team/app","tag":"v1"},"request":{"host":"registry.local:5000"}}]}`), "")
	f.Add([]byte(`{"events":[{"action":"push","target":{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"`+digest+`","repository":"../../etc","tag":"v1"}}]}`), "r.local")
	f.Add([]byte(`{"events":[{"action":"push","target":{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:zz","repository":"a","tag":"sha256-`+strings.Repeat("b", 64)+`"}}]}`), "r.local")
	f.Add([]byte(`{"events":null}`), "")
	f.Add([]byte(`{"events":[{"target":{"size":-1,"tag":"`+strings.Repeat("t", 300)+`"}}]}`), "h")
	f.Add([]byte(`[]`), "")
	f.Fuzz(func(t *testing.T, body []byte, host string) {
		env, err := ParseEnvelope(bytes.NewReader(body))
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("notification %q refused with %v; want ErrInvalid", body, err)
			}
			return
		}
		for _, ev := range env.Events {
			ref, why := Screen(ev, host)
			if why != "" {
				continue
			}
			if err := ref.Digest.Validate(); err != nil {
				t.Fatalf("event %+v let through with digest %q: %v", ev, ref.Digest, err)
			}
			again, err := fetcher.ParseRef(ref.String())
			if err != nil {
				t.Fatalf("event %+v let through as %q, which does not parse: %v", ev, ref.String(), err)
			}
			if again.String() != ref.String() {
				t.Fatalf("event %+v: reference %q parses back as %q", ev, ref.String(), again.String())
			}
		}
	})
}
