# Streamer. `make demo` runs the main job end to end; `make test` runs every test.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
GOFLAGS_TEST ?= -count=1

.PHONY: all build deps demo test test-faults fuzz-short unit integration bench bench-deps bench-readiness bench-quick fuzz vet clean

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
# Every fuzz target of remote data runs for FUZZTIME too (fuzz-short).
test: deps vet
	$(GO) test $(GOFLAGS_TEST) -timeout 10m $$($(GO) list ./... | grep -v /integration)
	$(MAKE) --no-print-directory fuzz-short
	$(GO) test $(GOFLAGS_TEST) -timeout 12m ./integration/...

# The node soak at full length (integration/load_test.go, docs/performance.md):
# containers read streamed images for 30 minutes while the registry is
# unreachable 10 s of every minute. `make test` runs it for 60 s.
soak: deps
	STREAMER_SOAK_DURATION=30m $(GO) test $(GOFLAGS_TEST) -timeout 45m -v -run '^TestNodeSoak$$' ./integration/

# Reliability and security suite: fault injection between the node and the
# registry, damaged cache, full disk, hostile artifacts, then every fuzz
# target of remote data for 10 s.
FUZZ_TARGETS := ./artifact:FuzzDecodeTOC ./artifact:FuzzTOCJSON ./artifact:FuzzParseManifest \
	./converter:FuzzTarReader ./fetcher:FuzzContentRange ./fetcher:FuzzReferrers \
	./service:FuzzWebhook ./cache:FuzzPackHeader
FUZZTIME ?= 5s
test-faults: deps
	$(GO) test $(GOFLAGS_TEST) -timeout 10m -v -run 'TestFaults|TestHostile|TestArtifactContentMismatch|TestDecodeTOCWhitespaceBomb|TestSpaceSqueezer' ./fs/ ./artifact/ || status=1; \
	$(MAKE) --no-print-directory fuzz-short FUZZTIME=10s || status=1; exit $${status:-0}

# Each fuzz target of remote data for FUZZTIME (CI: 5 s each); a run that
# ends on Go 1.26's fuzzing deadline race alone is tried once more
# (scripts/fuzz-short.sh).
fuzz-short:
	@bash scripts/fuzz-short.sh "$(GO)" $(FUZZTIME) $(FUZZ_TARGETS)

bench: deps bench-deps
	$(GO) test -run '^$$' -bench . -benchmem -timeout 60m ./...
	$(GO) run ./integration/cmd/bench $(BENCH_FLAGS)

# The readiness benchmark (integration/cmd/bench, docs/benchmarks.md): time to
# pod readiness, full pull against Streamer, over a shaped registry link.
# BENCH_FLAGS passes flags, e.g. BENCH_FLAGS="-profile cross-region -runs 3".
BENCH_FLAGS ?=
bench-deps: deps
	@bash scripts/install-deps.sh --bench

bench-readiness: bench-deps
	$(GO) run ./integration/cmd/bench $(BENCH_FLAGS)

# One small busybox image, 2 runs, same-region link: a few minutes, for CI.
bench-quick: deps
	$(GO) run ./integration/cmd/bench -quick $(BENCH_FLAGS)

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecodeTOC -fuzztime 30s ./artifact
	$(GO) test -run '^$$' -fuzz FuzzTarReader -fuzztime 30s ./converter

clean:
	rm -rf bin
