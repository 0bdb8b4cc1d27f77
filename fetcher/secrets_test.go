package fetcher

import (
	"bytes"
	"encoding/base64"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"

	"github.com/streamer-dev/streamer/internal/testenv"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestCredentialsNeverLogged runs the client against registries requiring
// basic auth and bearer tokens, at debug level, through successes and
// failures (wrong password, missing blob, registry down), and checks that
// no password, nor its base64 form in a Basic header, appears in a log
// line or an error message.
func TestCredentialsNeverLogged(t *testing.T) {
	const user, pass = "alice", "Pa55-never-in-logs-7f3c"
	const wrong = "Wr0ng-never-in-logs-91ab"
	logs := &syncBuffer{}
	std := logrus.StandardLogger()
	oldOut, oldLevel := std.Out, std.GetLevel()
	std.SetOutput(logs)
	std.SetLevel(logrus.TraceLevel)
	t.Cleanup(func() { std.SetOutput(oldOut); std.SetLevel(oldLevel) })

	for _, tc := range []struct {
		name string
		opts testenv.RegistryOptions
	}{
		{"basic auth", testenv.RegistryOptions{Htpasswd: map[string]string{user: pass}}},
		{"bearer token", testenv.RegistryOptions{Token: true, Htpasswd: map[string]string{user: pass}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := testenv.Registry(t, tc.opts)
			ref := mustRef(t, reg.Ref("secret/app", ":v1"))
			var errs []error
			c := newClient(t, Options{Username: user, Password: pass, Retries: 1})
			img := pushImage(t, c, ref, "linux/amd64", false, "v1", 4096)
			if _, err := c.ReadRange(testCtx(t), ref, img.Layer.Digest, 10, 100); err != nil {
				t.Fatalf("ReadRange with credentials: %v", err)
			}
			_, err := c.ReadRange(testCtx(t), ref, digest.FromString("missing"), 0, 10)
			errs = append(errs, err)
			_, err = c.FetchBlob(testCtx(t), ref, ocispec.Descriptor{Digest: digest.FromString("missing"), Size: 7})
			errs = append(errs, err)

			bad := newClient(t, Options{Username: user, Password: wrong, Retries: 1})
			_, err = bad.ReadRange(testCtx(t), ref, img.Layer.Digest, 0, 10)
			if !errors.Is(err, ErrUnauthorized) {
				t.Errorf("ReadRange with a wrong password: %v; want ErrUnauthorized", err)
			}
			errs = append(errs, err)
			_, err = bad.Resolve(testCtx(t), ref)
			errs = append(errs, err)

			reg.Stop()
			_, err = c.ReadRange(testCtx(t), ref, img.Layer.Digest, 0, 10)
			errs = append(errs, err)
			reg.Start()

			secrets := []string{pass, wrong, basic(user, pass), basic(user, wrong)}
			for _, e := range errs {
				if e == nil {
					t.Errorf("an operation meant to fail succeeded")
					continue
				}
				for _, s := range secrets {
					if strings.Contains(e.Error(), s) {
						t.Errorf("error message holds a secret: %v", e)
					}
				}
			}
			for _, s := range secrets {
				if strings.Contains(logs.String(), s) {
					t.Errorf("debug logs hold a secret (%d bytes of logs)", len(logs.String()))
				}
			}
			if logs.String() == "" {
				t.Logf("no debug log lines at all")
			}
			if os.Getenv(EnvPassword) != "" {
				t.Logf("note: %s is set in this environment", EnvPassword)
			}
		})
	}
}

func basic(user, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
}
