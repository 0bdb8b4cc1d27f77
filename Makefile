# Streamer. `make demo` runs the main job end to end; `make test` runs every test.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
GOFLAGS_TEST ?= -count=1

.PHONY: all build deps demo test unit integration bench fuzz vet clean

all: build

deps:
	@bash scripts/install-deps.sh
	@$(GO) mod download

build:
	$(GO) build -o bin/ ./cmd/...

demo: deps
	$(GO) run ./integration/cmd/demo

vet:
	$(GO) vet ./...

# Unit tests of every package, then the end-to-end tests (real registry,
# containerd, runc and FUSE, started and stopped by the tests).
test: deps vet
	$(GO) test $(GOFLAGS_TEST) -timeout 10m $$($(GO) list ./... | grep -v /integration)
	$(GO) test $(GOFLAGS_TEST) -timeout 12m ./integration/...

bench: deps
	$(GO) test -run '^$$' -bench . -benchmem -timeout 60m ./...

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecodeTOC -fuzztime 30s ./artifact
	$(GO) test -run '^$$' -fuzz FuzzTarReader -fuzztime 30s ./converter

clean:
	rm -rf bin
