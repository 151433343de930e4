# The two commands a newcomer needs: `make up` and `make test`. See README.md.
SHELL := /bin/bash
GO ?= go
GOTOOL := $(GO) tool -modfile=tools.mod
BIN := bin
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
CMDS := sandbox-scheduler sandbox-agent sandbox-executor sandboxctl
export CONTAINERD_ADDRESS ?= /run/containerd/containerd.sock

.PHONY: all build generate lint test test-unit images up cluster down bench clean

all: build

## build: static binaries into bin/
build:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ $(addprefix ./cmd/,$(CMDS))

## generate: regenerate protobuf and Connect code from proto/ (needs only the Go module proxy)
generate:
	$(GOTOOL) buf generate

## lint: gofmt, go vet, buf lint, and generated code is fresh
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GOTOOL) buf lint
	$(GOTOOL) buf generate
	@git diff --exit-code --stat -- api/gen || { echo "generated code in api/gen is stale: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- api/gen)" || { echo "generated code in api/gen is stale (new files): run make generate and commit"; git status --porcelain -- api/gen; exit 1; }

## images: build the template images without a registry and import them into
## containerd; PUSH=host:port also pushes them to that registry
images: build
	PUSH=$(PUSH) images/build.sh $(BIN)/sandbox-executor

## images-dockerfile: docker build the operator Dockerfiles (images/base,
## images/templates/*) FROM a debian:bookworm-slim imported from a debootstrap
## tree, and check the images; tags DOCKERFILE_PREFIX<name>:latest (default
## localhost/sandbox-dockerfile/). Needs root and dockerd.
.PHONY: images-dockerfile
images-dockerfile: build
	images/docker-build.sh $(BIN)/sandbox-executor

## test-images-dockerfile: the runtime conformance suite, on the Docker
## adapter, from the images make images-dockerfile built
DOCKERFILE_PREFIX ?= localhost/sandbox-dockerfile/
.PHONY: test-images-dockerfile
test-images-dockerfile:
	for t in python-basic python-datascience; do \
		CI=true SANDBOX_TEST_IMAGE=$(DOCKERFILE_PREFIX)$$t:latest $(GO) test -count=1 -timeout 10m -run 'TestConformance' ./agent/runtime/docker/ || exit 1; \
	done

## test: the whole suite (needs root, containerd, runc and bubblewrap; .ci/run installs them)
test: lint images
	$(GO) test -race -count=1 -timeout 30m ./...

## test-adversarial: hostile code through the public API into real sandboxes
## (SECURITY.md lists the cases and the layers that stop each), and the
## executor's own isolation and seccomp tests. Needs root, containerd, the
## images; make test runs them too.
.PHONY: test-adversarial
test-adversarial: images
	CI=true $(GO) test -race -count=1 -timeout 20m -v -run 'TestAdversarial' ./internal/e2e/
	CI=true $(GO) test -race -count=1 -timeout 10m -run 'TestExecutorIsolation|TestExecutorSeccomp|TestSeccomp' ./executor/ ./agent/runtime/containerd/

## test-adversarial-docker: the adversarial suite with the agent on
## --runtime docker (needs dockerd and the images loaded into it: make images
## does that when dockerd answers)
.PHONY: test-adversarial-docker
test-adversarial-docker: images
	CI=true SANDBOX_TEST_RUNTIME=docker $(GO) test -race -count=1 -timeout 20m -v -run 'TestAdversarial' ./internal/e2e/

## test-kubernetes: the runtime conformance suite on a real Kubernetes cluster
## (1.33 or later): the one KUBECONFIG (or SANDBOX_KUBECONFIG) names, in
## namespace SANDBOX_TEST_NAMESPACE (default sandbox-test, made if missing),
## with SANDBOX_TEST_IMAGE, an image its nodes can pull. Only the lifecycle
## cases run there (agent/runtime/kubernetes/realcluster_test.go says which);
## make test runs the suite on a fake cluster.
.PHONY: test-kubernetes
test-kubernetes:
	@test -n "$${SANDBOX_KUBECONFIG:-$$KUBECONFIG}" || { echo "test-kubernetes: set KUBECONFIG (or SANDBOX_KUBECONFIG) to the cluster's kubeconfig file"; exit 1; }
	@test -n "$$SANDBOX_TEST_IMAGE" || { echo "test-kubernetes: set SANDBOX_TEST_IMAGE to an image the cluster's nodes can pull"; exit 1; }
	SANDBOX_TEST_KUBERNETES=1 $(GO) test -race -count=1 -timeout 20m -v -run 'TestRealCluster' ./agent/runtime/kubernetes/

## test-fuzz: each fuzz target for FUZZTIME (default 1m): the artifact
## collector against hostile workspace trees, the validation of artifact
## paths, execution ids and env. go test runs their seeds; CI runs
## test-fuzz-ci (20s each).
FUZZTIME ?= 1m
FUZZ_TARGETS := ./executor:FuzzCollector ./agent/artifacts:FuzzValidate .:FuzzValidateEnv
.PHONY: test-fuzz test-fuzz-ci
test-fuzz:
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; \
		echo "== $$fn ($$pkg, $(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	done
test-fuzz-ci:
	$(MAKE) --no-print-directory test-fuzz FUZZTIME=20s

## test-unit: the tests that need nothing but Go
test-unit:
	$(GO) test -race -count=1 -short ./...

## test-chaos: repeat the kill tests RUNS times (default 20) with random
## schedules: a porcupine linearizability check of the API across leader kills,
## TestFailover (8 clients creating sessions and executing while the leader is
## killed -9: nothing acknowledged lost or duplicated, no election without a
## kill) and TestCluster (leader killed under load, agent killed mid-execution
## and restarted, partition-free membership changes). Each run's measurements
## go to $(CHAOS_OUT): failover.jsonl (recovery after the leader's kill) and
## agent-death.jsonl (how soon a killed agent's session is LOST); their
## p50/p99/max are printed at the end. Needs what `make test` needs, the images
## included (make images). CI runs it with RUNS=5 (test-chaos-ci).
## Replay a failed run: SANDBOX_CHAOS_SEED=<its seed> make test-chaos RUNS=1.
RUNS ?= 20
CHAOS_OUT ?= $(CURDIR)/$(BIN)/chaos
.PHONY: test-chaos test-chaos-ci
test-chaos:
	rm -f $(CHAOS_OUT)/failover.jsonl $(CHAOS_OUT)/agent-death.jsonl
	CI=true SANDBOX_CHAOS_RUNS=$(RUNS) SANDBOX_CHAOS_OUT=$(CHAOS_OUT) $(GO) test -race -count=1 -timeout 60m -run 'TestLinearizability' ./internal/e2e/
	CI=true SANDBOX_CHAOS_RUNS=$(RUNS) SANDBOX_CHAOS_OUT=$(CHAOS_OUT) $(GO) test -race -count=1 -timeout 60m -run 'TestFailover' ./internal/e2e/
	CI=true SANDBOX_CHAOS_OUT=$(CHAOS_OUT) $(GO) test -race -count=$(RUNS) -timeout 60m -run 'TestCluster' ./internal/e2e/
	@deploy/local/chaos-summary.sh $(CHAOS_OUT)

test-chaos-ci:
	$(MAKE) test-chaos RUNS=5

## up: install what is missing, build, start a local scheduler and agent, run a sample
## (RUNTIME=docker: the agent drives Docker instead of containerd)
RUNTIME ?= containerd
up:
	RUNTIME=$(RUNTIME) deploy/local/up.sh

## cluster: three servers (one Raft cluster) and two agents on loopback ports
cluster:
	RUNTIME=$(RUNTIME) deploy/local/cluster.sh

## down: stop what `make up` or `make cluster` started
down:
	deploy/local/down.sh

## bench: every benchmark scenario (bench/README.md) against the local cluster,
## started with make cluster when nothing answers on BENCH_ADDR; writes
## bench/results/<date>-bench.{json,md,svg}. N=runs per scenario (100),
## SCENARIOS=comma list (all). Needs root, like make cluster.
BENCH_ADDR ?= http://127.0.0.1:7400
BENCH_OUT ?= bench/results/$(shell date -u +%F)-bench
bench: build
	@SANDBOX_ADDR=$(BENCH_ADDR) $(BIN)/sandboxctl cluster status >/dev/null 2>&1 || $(MAKE) --no-print-directory cluster
	SANDBOX_ADDR=$(BENCH_ADDR) $(GO) run ./bench -scenario $(or $(SCENARIOS),all) -n $(or $(N),100) \
		-json $(BENCH_OUT).json -md $(BENCH_OUT).md -svg $(BENCH_OUT).svg

clean:
	rm -rf $(BIN)
