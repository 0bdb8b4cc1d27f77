package main

import (
	"encoding/json"
	"net/http"

	"github.com/containerd/log"

	"github.com/streamer-dev/streamer/artifact"
)

// ProfileResponse is the body of GET /profile?image=REF: the files the
// image's containers read first on this node, in first-read order, as
// absolute paths inside the image, and for each file of which they read
// only parts, those byte ranges ([offset, size] pairs): a startup profile
// for `streamer create --prefetch-list`.
type ProfileResponse struct {
	Image  string                      `json:"image"`
	Files  []string                    `json:"files"`
	Ranges map[string][]artifact.Range `json:"ranges,omitempty"`
}

// profileEndpoint serves GET /profile?image=REF from the manager the status
// endpoint points at; without image it lists the images with a profile.
// DELETE /profile?image=REF forgets the image's profile (streamer record
// does so before it starts the image).
type profileEndpoint struct{}

var profileHandler = profileEndpoint{}

func (profileEndpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead && r.Method != http.MethodDelete {
		w.Header().Set("Allow", "GET, HEAD, DELETE")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	mgr := statusHandler.mgr.Load()
	if mgr == nil {
		http.Error(w, "layer manager not running", http.StatusServiceUnavailable)
		return
	}
	image := r.URL.Query().Get("image")
	if r.Method == http.MethodDelete {
		if image == "" {
			http.Error(w, "DELETE /profile needs ?image=REF", http.StatusBadRequest)
			return
		}
		mgr.ResetProfile(image)
		w.WriteHeader(http.StatusNoContent)
		return
	}
	var body any
	if image == "" {
		body = struct {
			Images []string `json:"images"`
		}{mgr.ProfiledImages()}
	} else {
		files, ok := mgr.Profile(image)
		if !ok {
			http.Error(w, "no startup profile recorded for image "+image+" (not run on this node since the daemon started, or fetch.record_window is 0)", http.StatusNotFound)
			return
		}
		resp := ProfileResponse{Image: image, Files: make([]string, 0, len(files))}
		for _, f := range files {
			resp.Files = append(resp.Files, f.Path)
			if f.Ranges != nil {
				if resp.Ranges == nil {
					resp.Ranges = map[string][]artifact.Range{}
				}
				resp.Ranges[f.Path] = f.Ranges
			}
		}
		body = resp
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(body); err != nil {
		log.L.WithError(err).Debug("write profile")
	}
}
