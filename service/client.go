package service

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// EnvToken is the environment variable holding the API token for Client
// (and for `streamer serve` when --token is not given).
const EnvToken = "STREAMER_SERVER_TOKEN"

// Client calls a Service's HTTP API.
type Client struct {
	// URL is the service's base URL, e.g. "http://127.0.0.1:8080".
	URL string
	// Token is sent as "Authorization: Bearer TOKEN".
	Token string
	// HTTP is the client used; default one with a 30 s timeout.
	HTTP *http.Client
}

// APIError is an error response; errors.Is matches the service's kinds by
// status code.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("server: %s (HTTP %d)", e.Message, e.Status)
}

// Is maps the status code to ErrNotFound, ErrInvalid, ErrUnauthorized,
// ErrConflict or ErrUnavailable.
func (e *APIError) Is(target error) bool {
	switch target {
	case ErrNotFound:
		return e.Status == http.StatusNotFound
	case ErrInvalid:
		return e.Status == http.StatusBadRequest
	case ErrUnauthorized:
		return e.Status == http.StatusUnauthorized
	case ErrConflict:
		return e.Status == http.StatusConflict
	case ErrUnavailable:
		return e.Status == http.StatusBadGateway
	}
	return false
}

// ErrServerUnreachable: the service could not be reached.
var ErrServerUnreachable = errors.New("server unreachable")

func (c *Client) do(ctx context.Context, method, path string, in, out any) (int, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.URL, "/")+path, body)
	if err != nil {
		return 0, fmt.Errorf("server request %s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return 0, fmt.Errorf("server %s: %w", c.URL, ctx.Err())
		}
		return 0, fmt.Errorf("server %s: %w: %v", c.URL, ErrServerUnreachable, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return resp.StatusCode, fmt.Errorf("read server answer to %s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		var eb ErrorBody
		if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
			eb.Error = strings.TrimSpace(string(b))
		}
		return resp.StatusCode, &APIError{Status: resp.StatusCode, Message: eb.Error}
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("decode server answer to %s %s: %w", method, path, err)
		}
	}
	return resp.StatusCode, nil
}

// Create starts converting image; created is false when an operation for
// the image was already queued or running (that one is returned).
func (c *Client) Create(ctx context.Context, image string) (op *Operation, created bool, err error) {
	op = &Operation{}
	code, err := c.do(ctx, http.MethodPost, PathOperations, CreateRequest{Image: image}, op)
	return op, code == http.StatusCreated, err
}

// Operation returns operation id.
func (c *Client) Operation(ctx context.Context, id string) (*Operation, error) {
	op := &Operation{}
	_, err := c.do(ctx, http.MethodGet, PathOperations+"/"+url.PathEscape(id), nil, op)
	return op, err
}

// ForImage returns image's operations, newest first.
func (c *Client) ForImage(ctx context.Context, image string) ([]*Operation, error) {
	var ops []*Operation
	_, err := c.do(ctx, http.MethodGet, PathOperations+"?image="+url.QueryEscape(image), nil, &ops)
	return ops, err
}

// Cancel cancels operation id.
func (c *Client) Cancel(ctx context.Context, id string) (*Operation, error) {
	op := &Operation{}
	_, err := c.do(ctx, http.MethodPost, PathOperations+"/"+url.PathEscape(id)+"/cancel", nil, op)
	return op, err
}

// Wait polls operation id every interval until it is terminal (or ctx
// ends), calling fn (if not nil) with each state seen.
func (c *Client) Wait(ctx context.Context, id string, interval time.Duration, fn func(*Operation)) (*Operation, error) {
	for {
		op, err := c.Operation(ctx, id)
		if err != nil {
			return nil, err
		}
		if fn != nil {
			fn(op)
		}
		if op.State.Terminal() {
			return op, nil
		}
		select {
		case <-ctx.Done():
			return op, fmt.Errorf("wait for operation %s: %w", id, ctx.Err())
		case <-time.After(interval):
		}
	}
}

// SetStreaming turns auto-conversion of repository name on or off.
func (c *Client) SetStreaming(ctx context.Context, name string, on bool) (*Repository, error) {
	repo := &Repository{}
	_, err := c.do(ctx, http.MethodPut, PathRepo+"?name="+url.QueryEscape(name), RepositoryUpdate{Streaming: &on}, repo)
	return repo, err
}

// Repository returns repository name's setting and converted images.
func (c *Client) Repository(ctx context.Context, name string) (*Repository, error) {
	repo := &Repository{}
	_, err := c.do(ctx, http.MethodGet, PathRepo+"?name="+url.QueryEscape(name), nil, repo)
	return repo, err
}

// Repositories lists repositories with streaming enabled (all configured
// ones with all).
func (c *Client) Repositories(ctx context.Context, all bool) ([]Repository, error) {
	var repos []Repository
	_, err := c.do(ctx, http.MethodGet, PathRepos+fmt.Sprintf("?all=%t", all), nil, &repos)
	return repos, err
}

// DeleteArtifacts deletes image's streaming artifacts.
func (c *Client) DeleteArtifacts(ctx context.Context, image string) (*DeleteResult, error) {
	res := &DeleteResult{}
	_, err := c.do(ctx, http.MethodDelete, PathArtifacts+"?image="+url.QueryEscape(image), nil, res)
	return res, err
}
