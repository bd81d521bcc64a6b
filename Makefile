# One entry point for people and CI. `make dev` runs the service on throwaway
# credentials; `make test` runs every check CI runs. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUBS := clients/python/src
PROTOS := $(shell find proto -name '*.proto' | sort)
# The venv is (re)built when any dependency list changes.
INSTALLED := $(VENV)/.installed

.PHONY: dev bff test lint pytest bench generate check-generated clean

$(INSTALLED): pyproject.toml clients/python/pyproject.toml clients/bff/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/pip install --quiet -e ./clients/python -e ./clients/bff -e . --group dev
	touch $@

# wrk (Debian) drives the Express comparison in the benchmark and its smoke test;
# openssl makes the keys cryptography cannot (RSA-PSS, rare curves) for the config tests;
# valgrind counts instructions per request for bench.instructions and its smoke test.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
/usr/bin/wrk /usr/bin/openssl /usr/bin/valgrind:
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends wrk openssl valgrind

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian's Chromium drives the demo page's browser test (Playwright with executable_path:
# browser downloads cannot work here). Bounded: a stuck mirror must not eat CI's time.
/usr/bin/chromium:
	$(SUDO) timeout 600 sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium'

# The demo page: the Twilio Sync SDK bundled with the page's script, so the browser loads nothing
# but the BFF's own files. Built, not committed (gitignored).
BUNDLE := clients/bff/src/synctoken_bff/static/page.js
$(BUNDLE): clients/bff/web/page.js node_modules/.installed
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

test: lint check-generated pytest

# The tests compare tokens with Twilio's Node helper library, from npm, smoke-test
# the benchmark (which also needs wrk), and load the demo page in Chromium.
pytest: $(INSTALLED) node_modules/.installed /usr/bin/wrk /usr/bin/openssl /usr/bin/valgrind /usr/bin/chromium $(BUNDLE)
	$(BIN)/pytest

# The full benchmark, about eight minutes (five rounds): writes bench/results/results.{json,md,png}.
bench: $(INSTALLED) node_modules/.installed /usr/bin/wrk
	$(BIN)/python -m bench

lint: $(INSTALLED) node_modules/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	node_modules/.bin/buf lint

# protoc runs offline from grpcio-tools: buf's remote plugins need a network.
define protoc
	$(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(1) \
		$(PROTOS)
endef

# Node's stubs: buf with the local protoc-gen-es from node_modules (no remote plugins either).
NODE_GEN := node_modules/.bin/buf generate --template clients/node/buf.gen.yaml

generate: $(INSTALLED) node_modules/.installed
	$(call protoc,$(STUBS))
	$(NODE_GEN)

# synctoken/client is hand-written, beside the generated packages.
check-generated: $(INSTALLED) node_modules/.installed
	rm -rf .gen-check && mkdir .gen-check
	$(call protoc,.gen-check)
	@diff -r -x __init__.py -x py.typed -x __pycache__ -x client .gen-check/synctoken $(STUBS)/synctoken \
		|| { echo "Generated stubs are stale: run 'make generate' and commit the result."; exit 1; }
	$(NODE_GEN) --output .gen-check/node
	@diff -r .gen-check/node/clients/node/src/gen clients/node/src/gen \
		|| { echo "Generated Node stubs are stale: run 'make generate' and commit the result."; exit 1; }
	rm -rf .gen-check

clean:
	rm -rf $(VENV) node_modules $(BUNDLE) .gen-check .mypy_cache .ruff_cache .pytest_cache
