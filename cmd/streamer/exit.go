package main

import (
	"errors"

	"github.com/streamer-dev/streamer/artifact"
	"github.com/streamer-dev/streamer/converter"
	"github.com/streamer-dev/streamer/fetcher"
)

// Exit codes, documented in `streamer --help` and docs/cli.md.
const (
	exitGeneric      = 1
	exitUsage        = 2
	exitNotFound     = 3
	exitUnauthorized = 4
	exitUnreachable  = 5
	exitCorrupt      = 6
	exitUnsupported  = 7
	exitInterrupted  = 130
)

// exitCodesHelp is the exit code table shown by `streamer --help`.
const exitCodesHelp = `Exit codes:
  0    success
  1    other error
  2    usage error (bad command, flag or argument)
  3    not found (image, tag, platform or streaming artifact)
  4    unauthorized (credentials refused or missing)
  5    registry unreachable
  6    digest mismatch or corrupt input (layer, tar, TOC, manifest)
  7    unsupported media type (layer or manifest)
  130  interrupted (SIGINT/SIGTERM)`

// usageError marks errors in how the command was called.
type usageError struct{ err error }

func (u usageError) Error() string { return u.err.Error() }
func (u usageError) Unwrap() error { return u.err }

// interrupted marks an error that followed SIGINT or SIGTERM.
type interrupted struct{ err error }

func (i interrupted) Error() string { return "interrupted: " + i.err.Error() }
func (i interrupted) Unwrap() error { return i.err }

// exitCode maps an error to the process exit code; kinds are checked from
// the most specific.
func exitCode(err error) int {
	var u usageError
	var in interrupted
	switch {
	case err == nil:
		return 0
	case errors.As(err, &in):
		return exitInterrupted
	case errors.As(err, &u):
		return exitUsage
	case errors.Is(err, fetcher.ErrUnauthorized):
		return exitUnauthorized
	case errors.Is(err, fetcher.ErrUnreachable):
		return exitUnreachable
	case errors.Is(err, artifact.ErrDigestMismatch), errors.Is(err, converter.ErrCorruptLayer),
		errors.Is(err, converter.ErrBadTar), errors.Is(err, artifact.ErrInvalidTOC),
		errors.Is(err, artifact.ErrInvalidManifest):
		return exitCorrupt
	case errors.Is(err, converter.ErrUnsupportedMediaType), errors.Is(err, fetcher.ErrUnsupportedMediaType):
		return exitUnsupported
	case errors.Is(err, fetcher.ErrNotFound), errors.Is(err, fetcher.ErrNoArtifact):
		return exitNotFound
	}
	return exitGeneric
}
