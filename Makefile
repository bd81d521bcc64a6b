# One entry point for people and CI. `make dev` runs the service on throwaway
# credentials; `make test` runs every check CI runs. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUBS := clients/python/src
PROTOS := $(shell find proto -name '*.proto' | sort)
# The venv is synced from uv.lock whenever the lock or a dependency list changes.
INSTALLED := $(VENV)/.installed

.PHONY: dev bff test test-fast lint pytest bench generate check-generated check-lock lock test-lowest clean image image-test

# uv, pinned with hashes (tools/uv.txt, compiled from tools/uv.in), in a venv of its own: the
# project's venv holds exactly what uv.lock says, and nothing on the host is touched.
UV_VENV := .uv
UV := $(UV_VENV)/bin/uv
# Never download a Python: use the host's $(PYTHON), as CI does.
export UV_PYTHON_DOWNLOADS := never
$(UV): tools/uv.txt
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/pip install --quiet --require-hashes --no-deps -r tools/uv.txt
	touch $@

# Exactly the locked versions (--locked also fails when uv.lock no longer satisfies a
# pyproject.toml): the service, clients/python, clients/bff (editable) and every dev group.
$(INSTALLED): $(UV) uv.lock pyproject.toml clients/python/pyproject.toml clients/bff/pyproject.toml
	$(UV) sync --quiet --locked --all-packages --python $(PYTHON)
	touch $@

# Refresh the lock on purpose, to the newest versions the ranges allow; then run `make test`.
lock: $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

# CI: the lock must still satisfy every pyproject.toml (a range edited without `make lock` fails).
check-lock: $(UV)
	$(UV) lock --check --python $(PYTHON)

# Debian packages, each installed only when missing, never upgraded when present (--no-upgrade),
# one package per rule. apt may still upgrade a shared library that a new package needs a newer
# version of. Bounded: a stuck mirror must not eat CI's time.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
apt_install = $(SUDO) timeout 600 sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends --no-upgrade $(1)'

# wrk drives the Express comparison in the benchmark and its smoke test.
/usr/bin/wrk:
	$(call apt_install,wrk)
# openssl makes the keys cryptography cannot (RSA-PSS, rare curves) for the config tests.
/usr/bin/openssl:
	$(call apt_install,openssl)
# valgrind counts instructions per request for bench.instructions and its smoke test.
/usr/bin/valgrind:
	$(call apt_install,valgrind)
# Chromium drives the demo page's browser test (Playwright with executable_path: browser
# downloads cannot work here).
/usr/bin/chromium:
	$(call apt_install,chromium)
# systemd-analyze checks the unit in deploy/systemd (verify, security --offline); systemd need not run.
/usr/bin/systemd-analyze:
	$(call apt_install,systemd)
# redis-server backs the global rate limits' tests: real Redis processes on free loopback ports
# (plain, with a password, over TLS: Debian's build has TLS).
/usr/bin/redis-server:
	$(call apt_install,redis-server)

# HAProxy is the load balancer in front of three replicas in the replica tests, running
# deploy/haproxy/haproxy.cfg itself.
/usr/sbin/haproxy:
	$(call apt_install,haproxy)

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The browser token provider (clients/browser), as its npm package ships it: one ES module, its own
# modules bundled, no dependencies. Built, not committed (gitignored), like the demo page.
BROWSER_SRC := $(wildcard clients/browser/src/*.js)
BROWSER_DIST := clients/browser/dist/index.js
$(BROWSER_DIST): $(BROWSER_SRC) node_modules/.installed
	node_modules/.bin/esbuild clients/browser/src/index.js --bundle --format=esm --target=es2020 \
		--platform=browser --outfile=$@ --log-level=warning

# The demo page: the Twilio Sync SDK bundled with the page's script (and the token provider), so the
# browser loads nothing but the BFF's own files. Built, not committed (gitignored).
BUNDLE := clients/bff/src/synctoken_bff/static/page.js
$(BUNDLE): clients/bff/web/page.js $(BROWSER_SRC) node_modules/.installed
	node_modules/.bin/esbuild $< --bundle --format=esm --target=es2020 --platform=browser \
		--outfile=$@ --log-level=warning

dev: $(INSTALLED)
	$(BIN)/synctoken dev

# The BFF and its demo page at http://127.0.0.1:8080/, against `make dev`'s synctoken (run that first).
DEV := .synctoken-dev
bff: $(INSTALLED) $(BUNDLE)
	SYNCTOKEN_TARGET=localhost:50051 SYNCTOKEN_CA_FILE=$(DEV)/ca.pem \
		SYNCTOKEN_CERT_FILE=$(DEV)/client.pem SYNCTOKEN_KEY_FILE=$(DEV)/client-key.pem \
		$(BIN)/synctoken-bff --host 127.0.0.1 --port 8080

test: check-lock lint check-generated pytest

# The tests compare tokens with Twilio's Node helper library, from npm, smoke-test
# the benchmark (which also needs wrk), load the demo page in Chromium, run HAProxy and Redis.
PYTEST_NEEDS := node_modules/.installed /usr/bin/wrk /usr/bin/openssl /usr/bin/valgrind /usr/bin/chromium /usr/sbin/haproxy \
	/usr/bin/redis-server /usr/bin/systemd-analyze $(BUNDLE) $(BROWSER_DIST)
pytest: $(INSTALLED) $(PYTEST_NEEDS)
	$(BIN)/pytest

# The inner loop: no lint, and no test marked slow (see the marker in pyproject.toml).
test-fast: $(INSTALLED) $(PYTEST_NEEDS)
	$(BIN)/pytest -m "not slow"

# The tested lower bounds: the lowest versions every direct dependency's range allows, in a
# venv of their own (.venv-lowest), and the whole pytest suite. Run by hand when a lower bound changes; the README says what it last gave.
LOWEST := .venv-lowest
test-lowest: $(UV) $(PYTEST_NEEDS)
	rm -rf $(LOWEST)
	$(UV) venv --quiet --python $(PYTHON) $(LOWEST)
	VIRTUAL_ENV=$(LOWEST) $(UV) pip install --quiet --resolution lowest-direct \
		-e ./clients/python -e ./clients/bff -e . --group dev
	$(LOWEST)/bin/pytest -p no:cacheprovider

# The full benchmark, about ten minutes (five rounds; synctoken-redis starts its own redis-server): writes bench/results/results.{json,md,png}.
bench: $(INSTALLED) node_modules/.installed /usr/bin/wrk /usr/bin/redis-server
	$(BIN)/python -m bench

lint: $(INSTALLED) node_modules/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	node_modules/.bin/buf lint
	$(BIN)/hadolint Dockerfile

# protoc runs offline from grpcio-tools: buf's remote plugins need a network.
define protoc
	$(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(1) \
		$(PROTOS)
endef

# The stand-in SPIFFE agent's stubs (tests/support/workloadapi), from the standard's workload.proto kept
# beside them, outside proto/: not synctoken's API, and buf's STANDARD lint would refuse its layout.
WORKLOAD_PROTO := tests/support/workloadapi/workload.proto
define protoc_workload
	$(BIN)/python -m grpc_tools.protoc -I tests \
		--python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(1) \
		$(WORKLOAD_PROTO)
endef

# Node's stubs: buf with the local protoc-gen-es from node_modules (no remote plugins either).
NODE_GEN := node_modules/.bin/buf generate --template clients/node/buf.gen.yaml

generate: $(INSTALLED) node_modules/.installed
	$(call protoc,$(STUBS))
	$(call protoc_workload,tests)
	$(NODE_GEN)

# Only synctoken/v1 (and the stand-in agent's workload API stubs) are generated; the rest is hand-written.
check-generated: $(INSTALLED) node_modules/.installed
	rm -rf .gen-check && mkdir .gen-check
	$(call protoc,.gen-check)
	@diff -r -x __init__.py -x py.typed -x __pycache__ .gen-check/synctoken/v1 $(STUBS)/synctoken/v1 \
		|| { echo "Generated stubs are stale: run 'make generate' and commit the result."; exit 1; }
	mkdir .gen-check/workload
	$(call protoc_workload,.gen-check/workload)
	@diff -r -x __init__.py -x __pycache__ -x workload.proto .gen-check/workload/support/workloadapi tests/support/workloadapi \
		|| { echo "The stand-in agent's stubs are stale: run 'make generate' and commit the result."; exit 1; }
	$(NODE_GEN) --output .gen-check/node
	@diff -r .gen-check/node/clients/node/src/gen clients/node/src/gen \
		|| { echo "Generated Node stubs are stale: run 'make generate' and commit the result."; exit 1; }
	rm -rf .gen-check

# The container image (see the Dockerfile and the README's "Deploying"), built with Debian's podman
# as root: no image registry is reachable here, so the base is a root file system made with
# debootstrap from the Debian mirror apt uses, imported as an image. vfs storage and runc work
# where overlayfs and crun do not (nested containers); the open-file limit is lowered below the
# host's hard limits, which podman's defaults (1048576 files, more processes) would exceed.
IMAGE := synctoken:0.1.0
IMAGE_DIR := build/image
BASE_IMAGE := localhost/synctoken-base:bookworm
PODMAN := $(SUDO) podman --storage-driver vfs --runtime runc
PODMAN_ULIMIT := --ulimit nofile=16384:16384 --ulimit nproc=4096:4096
DEBIAN_MIRROR ?= $(shell sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1 | grep . || echo http://deb.debian.org/debian)
export PODMAN PODMAN_ULIMIT IMAGE

/usr/bin/podman:
	$(call apt_install,podman)
/usr/sbin/runc:
	$(call apt_install,runc)
/usr/sbin/debootstrap:
	$(call apt_install,debootstrap)

# Debian's minimal system and its python3, caches removed; imported once (again after `make clean`).
$(IMAGE_DIR)/base.imported: /usr/sbin/debootstrap /usr/bin/podman /usr/sbin/runc
	$(SUDO) rm -rf $(IMAGE_DIR)/rootfs && mkdir -p $(IMAGE_DIR)
	$(SUDO) timeout 1200 debootstrap --variant=minbase --include=python3 bookworm $(IMAGE_DIR)/rootfs $(DEBIAN_MIRROR)
	$(SUDO) sh -c 'rm -rf $(IMAGE_DIR)/rootfs/var/cache/apt/archives/*.deb $(IMAGE_DIR)/rootfs/var/lib/apt/lists/* \
		$(IMAGE_DIR)/rootfs/var/log/* && tar -C $(IMAGE_DIR)/rootfs --numeric-owner -c . | $(PODMAN) import - $(BASE_IMAGE)'
	$(SUDO) rm -rf $(IMAGE_DIR)/rootfs
	touch $@

# The build context: the service's locked dependencies as wheels (with the lock's hashes), the two
# project wheels built from this tree, and uv itself. The image's python3 is Debian's (3.11.2), not
# this host's: the markers (async-timeout's python_full_version < '3.11.3', say) are for the install
# in the image to evaluate, so every wheel the lock lists is fetched, whatever they say here.
$(IMAGE_DIR)/context: $(INSTALLED) uv.lock pyproject.toml Dockerfile $(shell git ls-files service clients/python)
	rm -rf $@ && mkdir -p $@/wheels
	$(UV) export --quiet --frozen --package synctoken --no-dev --no-emit-workspace --format requirements-txt \
		-o $@/wheels/requirements.txt
	sed 's/ ;[^\\]*\\$$/ \\/' $@/wheels/requirements.txt > $@/download.txt
	$(UV_VENV)/bin/pip download --quiet --no-deps --only-binary=:all: --require-hashes \
		-r $@/download.txt -d $@/wheels
	$(UV) build --quiet --wheel --package synctoken-api -o $@/wheels
	$(UV) build --quiet --wheel --package synctoken -o $@/wheels
	cp $(UV) $@/uv
	cp Dockerfile $@/Dockerfile

image: $(IMAGE_DIR)/base.imported $(IMAGE_DIR)/context
	$(PODMAN) build $(PODMAN_ULIMIT) --network none --build-arg BASE=$(BASE_IMAGE) -t $(IMAGE) $(IMAGE_DIR)/context

# Minutes, so not in `make test`: one mTLS call served from the container, then a drain on `podman stop`.
image-test: image $(INSTALLED)
	$(BIN)/pytest -p no:cacheprovider tests/deploy/image_smoke.py

clean:
	rm -rf $(VENV) $(UV_VENV) $(LOWEST) node_modules $(BUNDLE) clients/browser/dist .gen-check .mypy_cache .ruff_cache .pytest_cache $(IMAGE_DIR)
