// Package deploy holds the Kubernetes manifests that run streamer-snapshotter
// on nodes (a kustomization of a namespace, a service account and a
// DaemonSet), embedded so tests and tools can read them. docs/install.md
// explains every field.
package deploy

import "embed"

// Manifests are the YAML files of this directory.
//
//go:embed *.yaml
var Manifests embed.FS
