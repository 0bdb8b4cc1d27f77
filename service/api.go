package service

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// API paths. Every /v1/ path but the webhook needs the API token.
const (
	PathOperations = "/v1/operations"
	PathRepos      = "/v1/repositories"
	PathRepo       = "/v1/repository"
	PathArtifacts  = "/v1/artifacts"
	PathWebhook    = "/v1/webhooks/registry"
	PathHealth     = "/healthz"
)

// ErrorBody is the body of every error response.
type ErrorBody struct {
	Error string `json:"error"`
}

// CreateRequest is the body of POST /v1/operations.
type CreateRequest struct {
	Image string `json:"image"`
}

// RepositoryUpdate is the body of PUT /v1/repository?name=NAME.
type RepositoryUpdate struct {
	Streaming *bool `json:"streaming"`
}

// DeleteResult is the body of a successful DELETE /v1/artifacts.
type DeleteResult struct {
	Image   string          `json:"image"`
	Deleted []digest.Digest `json:"deleted"`
}

// WebhookResult is the body of a successful webhook call.
type WebhookResult struct {
	Events []EventDecision `json:"events"`
}

// Handler returns the HTTP API (docs/api.md).
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PathHealth, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	api := func(pattern string, h http.HandlerFunc) { mux.Handle(pattern, s.authenticated(s.cfg.Token, h)) }
	api("POST "+PathOperations, s.handleCreate)
	api("GET "+PathOperations, s.handleList)
	api("GET "+PathOperations+"/{id}", s.handleGet)
	api("POST "+PathOperations+"/{id}/cancel", s.handleCancel)
	api("GET "+PathRepos, s.handleRepos)
	api("GET "+PathRepo, s.handleRepo)
	api("PUT "+PathRepo, s.handleSetRepo)
	api("DELETE "+PathArtifacts, s.handleDelete)
	mux.Handle("POST "+PathWebhook, s.authenticated(s.cfg.WebhookSecret, s.handleWebhook))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, fmt.Errorf("%s %s: %w", r.Method, r.URL.Path, ErrNotFound))
	})
	return mux
}

// authenticated requires "Authorization: Bearer secret".
func (s *Service) authenticated(secret string, h http.HandlerFunc) http.Handler {
	want := []byte("Bearer " + secret)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		if secret == "" || subtle.ConstantTimeCompare(got, want) != 1 {
			log.G(r.Context()).WithFields(log.Fields{"path": r.URL.Path, "remote": r.RemoteAddr}).Warn("request refused: bad or missing credentials")
			w.Header().Set("WWW-Authenticate", `Bearer realm="streamer"`)
			writeError(w, r, fmt.Errorf("%s: %w: missing or wrong bearer credentials", r.URL.Path, ErrUnauthorized))
			return
		}
		h(w, r)
	})
}

func (s *Service) handleCreate(w http.ResponseWriter, r *http.Request) {
	var req CreateRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, r, err)
		return
	}
	op, created, err := s.Create(r.Context(), req.Image)
	if err != nil {
		writeError(w, r, err)
		return
	}
	code := http.StatusOK
	if created {
		code = http.StatusCreated
	}
	w.Header().Set("Location", PathOperations+"/"+op.ID)
	writeJSON(w, code, op)
}

func (s *Service) handleList(w http.ResponseWriter, r *http.Request) {
	var (
		ops []*Operation
		err error
	)
	if image := r.URL.Query().Get("image"); image != "" {
		ops, err = s.ForImage(r.Context(), image)
	} else {
		ops, err = s.store.Operations(nil)
	}
	if err != nil {
		writeError(w, r, err)
		return
	}
	if ops == nil {
		ops = []*Operation{}
	}
	writeJSON(w, http.StatusOK, ops)
}

func (s *Service) handleGet(w http.ResponseWriter, r *http.Request) {
	op, err := s.Operation(r.PathValue("id"))
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, op)
}

func (s *Service) handleCancel(w http.ResponseWriter, r *http.Request) {
	op, err := s.Cancel(r.Context(), r.PathValue("id"))
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, op)
}

// withImages fills a repository's converted images from its succeeded
// operations, newest first, one per image manifest.
func (s *Service) withImages(repo Repository) (Repository, error) {
	ops, err := s.store.Operations(func(o *Operation) bool { return o.Repository == repo.Name && o.State == Succeeded })
	if err != nil {
		return repo, err
	}
	seen := map[digest.Digest]bool{}
	repo.Images = []ConvertedImage{}
	for _, op := range ops {
		if seen[op.Digest] {
			continue
		}
		seen[op.Digest] = true
		ci := ConvertedImage{Image: op.Image, Digest: op.Digest, Artifact: op.Artifact, Operation: op.ID}
		if op.Finished != nil {
			ci.Finished = *op.Finished
		}
		repo.Images = append(repo.Images, ci)
	}
	return repo, nil
}

func (s *Service) handleRepos(w http.ResponseWriter, r *http.Request) {
	all := r.URL.Query().Get("all") == "true"
	repos, err := s.store.Repositories()
	if err != nil {
		writeError(w, r, err)
		return
	}
	out := []Repository{}
	for _, repo := range repos {
		if !repo.Streaming && !all {
			continue
		}
		if repo, err = s.withImages(repo); err != nil {
			writeError(w, r, err)
			return
		}
		out = append(out, repo)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	writeJSON(w, http.StatusOK, out)
}

func (s *Service) handleRepo(w http.ResponseWriter, r *http.Request) {
	name, err := NormalizeRepository(r.URL.Query().Get("name"))
	if err != nil {
		writeError(w, r, err)
		return
	}
	repo, err := s.store.Repository(name)
	if err == nil {
		repo, err = s.withImages(repo)
	}
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, repo)
}

func (s *Service) handleSetRepo(w http.ResponseWriter, r *http.Request) {
	name, err := NormalizeRepository(r.URL.Query().Get("name"))
	if err != nil {
		writeError(w, r, err)
		return
	}
	var req RepositoryUpdate
	if err := decodeBody(r, &req); err != nil {
		writeError(w, r, err)
		return
	}
	if req.Streaming == nil {
		writeError(w, r, fmt.Errorf("repository %s: %w: body needs \"streaming\": true or false", name, ErrInvalid))
		return
	}
	repo, err := s.SetStreaming(r.Context(), name, *req.Streaming)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, repo)
}

func (s *Service) handleDelete(w http.ResponseWriter, r *http.Request) {
	image := r.URL.Query().Get("image")
	deleted, err := s.DeleteArtifacts(r.Context(), image)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, DeleteResult{Image: image, Deleted: deleted})
}

func (s *Service) handleWebhook(w http.ResponseWriter, r *http.Request) {
	env, err := ParseEnvelope(r.Body)
	if err != nil {
		writeError(w, r, err)
		return
	}
	// The registry does not wait for conversions; only for the queueing.
	ctx := context.WithoutCancel(r.Context())
	writeJSON(w, http.StatusAccepted, WebhookResult{Events: s.HandleEnvelope(ctx, env)})
}

// SetStreaming turns auto-conversion of repository name (already
// normalized or not) on or off. Nothing is converted or deleted by it.
func (s *Service) SetStreaming(ctx context.Context, name string, on bool) (Repository, error) {
	name, err := NormalizeRepository(name)
	if err != nil {
		return Repository{}, err
	}
	repo, err := s.store.Repository(name)
	if err != nil {
		return repo, err
	}
	repo.Streaming = on
	repo.Updated = timeNow()
	if err := s.store.SetRepository(repo); err != nil {
		return repo, err
	}
	log.G(ctx).WithFields(log.Fields{"repository": name, "streaming": on}).Info("repository streaming setting changed")
	return s.withImages(repo)
}

// decodeBody decodes a small JSON request body, unknown fields refused.
func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("request body: %w: %v", ErrInvalid, err)
	}
	return nil
}

// statusOf maps an error's kind to an HTTP status.
func statusOf(err error) int {
	switch {
	case errors.Is(err, ErrUnauthorized):
		return http.StatusUnauthorized
	case errors.Is(err, ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrConflict):
		return http.StatusConflict
	case errors.Is(err, ErrUnavailable):
		return http.StatusBadGateway
	}
	return http.StatusInternalServerError
}

func writeError(w http.ResponseWriter, r *http.Request, err error) {
	code := statusOf(err)
	if code == http.StatusInternalServerError {
		log.G(r.Context()).WithError(err).WithField("path", r.URL.Path).Error("request failed")
	}
	writeJSON(w, code, ErrorBody{Error: oneLine(err.Error())})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// oneLine keeps a message on one line.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
