# csi-dmthin. `make demo` and `make test` are the README's quick start: each
# installs what it needs (hack/install-deps.sh) on a fresh Debian machine.

GO       ?= go
BIN      := bin
TIMEOUT  ?= 60m
GOFILES   = $(shell find . -name '*.go' -not -path './.cache/*' -not -path './bin/*')

.PHONY: all build test test-unit test-vm test-faults bench bench-group bench-scale lint fmt demo deps fuzz clean e2e e2e-full bench-e2e e2e-deps e2e-build e2e-tools-tidy image image-archive manifests

all: build

deps:
	@./hack/install-deps.sh

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./cmd/...

lint:
	@out="$$(gofmt -l $(GOFILES))"; if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags vmtest ./...

fmt:
	gofmt -w $(GOFILES)

# Everything: vet, the host tests under the race detector, the kernel
# tests, which each package's TestVM runs in a qemu VM on Debian's kernel,
# and then the end-to-end test on a real Kubernetes (make e2e). The e2e
# builds (Kubernetes, the sidecars, the node image; nothing to do once
# cached) run beside the Go tests at nice 19, taking the CPU the tests
# leave; their output follows the tests'.
test: deps lint
	@mkdir -p $(BIN); \
	nice -n 9 $(MAKE) --no-print-directory e2e-build >$(BIN)/e2e-build.log 2>&1 & build=$$!; \
	$(GO) test -race -count=1 -timeout $(TIMEOUT) ./...; tests=$$?; \
	wait $$build; built=$$?; \
	echo "--- make e2e-build (beside the tests), exit $$built:"; cat $(BIN)/e2e-build.log; \
	[ $$tests -eq 0 ] && [ $$built -eq 0 ]
	$(MAKE) e2e

# Host tests only (no VM).
test-unit:
	$(GO) test -race -skip '^TestVM$$|^TestPowerCut$$' ./...

# Kernel tests only, in the VM, with their output (the power cuts too).
test-vm: deps
	$(GO) test -v -run '^TestVM$$|^TestPowerCut$$' -timeout $(TIMEOUT) ./...

# The long fault runs that make test keeps short: the real kernel's whole
# fault matrix (four errnos) and a second crash at every step of every
# recovery; 200 power cuts; 1000 SIGKILLs of serve. About three hours under
# TCG.
FAULTS_TIMEOUT ?= 150m
test-faults: deps
	CSI_DMTHIN_FAULTS=full $(GO) test -count=1 -v -run '^TestVM$$' -timeout $(FAULTS_TIMEOUT) ./pkg/thinpool
	CSI_DMTHIN_POWERCUT_CUTS=200 $(GO) test -count=1 -v -run '^TestPowerCut$$' -timeout $(FAULTS_TIMEOUT) ./pkg/thinpool
	CSI_DMTHIN_KILLS=1000 $(GO) test -count=1 -v -run '^TestVM$$' -timeout $(FAULTS_TIMEOUT) ./cmd/csi-dmthin

# A short run of every fuzz target (go test -fuzz takes one target at a time).
FUZZTIME ?= 10s
fuzz:
	@for pkg in ./pkg/devmapper; do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

# Host benchmarks (to bench/results/host.txt), then the kernel benchmark
# tables from one VM run (bench/results/table.md, every timing in
# samples.json): the README's tables are these files.
bench: deps
	@mkdir -p bench/results
	$(GO) test -run '^$$' -bench . -benchmem ./pkg/... >bench/results/host.txt; st=$$?; cat bench/results/host.txt; exit $$st
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./cmd/csi-dmthin ./cmd/dmthin-bench
	$(BIN)/dmthin-bench -out bench/results

# Only the group snapshot table (README: Group snapshots), one VM run.
bench-group: deps
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./cmd/csi-dmthin ./cmd/dmthin-bench
	$(BIN)/dmthin-bench -only group -n 10

# Issue 12's figures at 1,000 nodes and 10,000 claims, one run on in-process
# fakes: what a node's side and the cluster's controller ask of the API
# server and keep, how fast the controller places 100 restores, and the
# sidecars' informers beside them (pkg/kube/scale_bench_test.go).
bench-scale:
	$(GO) test -run '^$$' -bench 'Scale' -benchtime 1x ./pkg/kube

demo: deps
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/dmthin-demo ./cmd/dmthin-demo
	$(BIN)/dmthin-demo

# The image the chart deploys by default: $(IMAGE_REGISTRY)/$(IMAGE_REPOSITORY)
# at the chart's appVersion, which is the one place the version is written.
CHART          := charts/csi-dmthin
VERSION        ?= $(shell sed -n 's/^appVersion: *"*\([^"]*\)"*$$/\1/p' $(CHART)/Chart.yaml)
IMAGE_REGISTRY   ?= localhost
IMAGE_REPOSITORY ?= csi-dmthin
IMAGE          ?= $(IMAGE_REGISTRY)/$(IMAGE_REPOSITORY):$(VERSION)
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)

image:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
		echo "make image: needs docker or podman (neither is on PATH); set CONTAINER_ENGINE=/path/to/one" >&2; exit 1; \
	fi
	$(CONTAINER_ENGINE) build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

# The same image as an OCI archive, without docker or podman: the packages
# of hack/runtime-packages.txt (apt-get download) and the static binary,
# written in Go. Air-gapped nodes load it with
# `ctr -n k8s.io images import $(BIN)/csi-dmthin-$(VERSION).oci.tar`.
image-archive:
	$(GO) run ./hack/image-archive -version $(VERSION) -ref $(IMAGE) -out $(BIN)/csi-dmthin-$(VERSION).oci.tar

# deploy/kubernetes/ is the chart rendered with its default values; the deploy
# package's test fails when the two differ, and -update rewrites the files.
manifests:
	$(GO) test ./deploy -run '^TestManifestsMatchDefaultRender$$' -update

# The end-to-end test: a Kubernetes cluster (control plane on the host, two
# nodes in qemu VMs) inside a network namespace with only loopback and the
# nodes' bridge, the chart installed, the scenarios of test/e2e (the two-node
# ones too) and the topology and capacity suites of Kubernetes' external
# storage suite. Needs root. e2e-build first builds Kubernetes, the sidecars
# and the suite from the Go module proxy and the node image (all cached
# afterwards), outside the test's timeout.
E2E_TIMEOUT ?= 60m
e2e: e2e-build
	CSI_DMTHIN_E2E=1 $(GO) test -count=1 -v -timeout $(E2E_TIMEOUT) ./test/e2e/

# The same with every applicable spec of Kubernetes' external storage suite,
# the Slow and Serial ones too, then the Disruptive ones one at a time
# (test/e2e/README.md says which run where). The timeout leaves room for
# both parts' own ginkgo timeouts (3 h and 90 min) to end them first.
E2E_FULL_TIMEOUT ?= 300m
e2e-full: e2e-build
	CSI_DMTHIN_E2E=1 CSI_DMTHIN_E2E_STORAGE=full $(GO) test -count=1 -v -timeout $(E2E_FULL_TIMEOUT) ./test/e2e/

# Pod start with a new WaitForFirstConsumer claim against an emptyDir
# (issue 14) at the issue's 20 pods a side, on a cluster of its own and
# nothing else (make e2e measures 4 a side); the table goes to the test
# log and to podstart.md in the run directory. Then a copy between the
# nodes at full speed against dd | nc of the same data (issue 16), to
# copybench.md.
bench-e2e: e2e-build
	CSI_DMTHIN_E2E=1 CSI_DMTHIN_E2E_PODSTART_PODS=20 CSI_DMTHIN_E2E_COPYBENCH=1 CSI_DMTHIN_E2E_COPY_RATE=0 $(GO) test -count=1 -v -timeout $(E2E_TIMEOUT) -run '^(TestPodStart|TestCopyThroughput)$$' ./test/e2e/

e2e-deps:
	@./hack/install-e2e-deps.sh

# Only the builds (tools, node image), e.g. to warm a CI cache.
e2e-build: e2e-deps
	$(GO) run ./test/e2e/cmd/e2e-build

# Regenerate test/e2e/tools/*/go.mod after changing test/e2e/versions.env.
e2e-tools-tidy:
	$(GO) run ./test/e2e/tools/tidy.go

clean:
	rm -rf $(BIN)
