# Sluice developer commands. `make demo` and `make test` set everything up on a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_OUT := services
PROTOS := $(shell find protos -name '*.proto') $(shell find model_repository -maxdepth 3 -name '*.pbtxt' -o -maxdepth 3 -name model.py)
STAMP := $(VENV)/.sluice-installed

.PHONY: demo test test-slow fuzz proto lint typecheck check build up bench eval clean images test-containers

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m sluice.tools.triton_setup
	@touch $(STAMP)

# Generated gRPC/protobuf code and model templates (the package build makes them too):
# never edited by hand, never committed.
$(PROTO_OUT)/sluice/v1/storefront_pb2.py: $(PROTOS) | $(STAMP)
	$(PY) -m sluice.tools.protogen

proto: $(STAMP)
	$(PY) -m sluice.tools.protogen

setup: $(STAMP) $(PROTO_OUT)/sluice/v1/storefront_pb2.py

# Build the embedded default, start Triton and every service, send sample queries.
demo: setup
	$(VENV)/bin/sluice demo

# The whole default test suite (CI runs exactly this).
test: setup
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	{ command -v haproxy || test -x /usr/sbin/haproxy; } >/dev/null || missing="$$missing haproxy"; \
	test -z "$$missing" || { apt-get update -qq && apt-get install -y -qq $$missing; }
	$(PY) -m pytest

# The public contract (sluice.v1 and the sluice.common.v1 it imports) stays wire-compatible
# with this commit; the internal stage protos are versioned on their own (v2).
# buf clones 50 commits deep by default: depth= reaches back to it
BREAKING_AGAINST ?= 8eb4a55

# The suites kept out of the default run: several service processes for minutes (slow), and
# the container images built and run with podman (container; see docs/deploy.md).
test-slow: setup
	$(PY) -m pytest -m slow

# The long fuzz run: 2,000 seeded cases for each of the eight methods (the default suite runs 300).
fuzz: setup
	SLUICE_FUZZ_CASES=2000 $(PY) -m pytest tests/integration/test_fuzz.py -s

lint: setup
	$(VENV)/bin/ruff check services tests
	$(VENV)/bin/ruff format --check services tests
	$(VENV)/bin/mypy
	cd protos && ../$(VENV)/bin/buf lint
	cd protos && ../$(VENV)/bin/buf breaking --against '../.git#ref=$(BREAKING_AGAINST),subdir=protos,depth=100000' \
		--path sluice/v1 --path sluice/common/v1

# Container images with podman (deploy/images/build.sh): installs podman, buildah, mmdebstrap
# and runc if missing, makes the Debian base, builds the images, prints their sizes.
images:
	deploy/images/build.sh

# The container test (marker `container`, not in `make test`): builds the images (podman's
# layer cache makes an unchanged tree quick; SLUICE_CONTAINER_REUSE=1 uses what `make images`
# built, if it is current), trains a small shop in the build image, serves the cascade from
# the images and through the podman overlay's `podman kube play`.
test-containers: setup
	$(PY) -m pytest -m container tests/container

clean:
	rm -rf var artifacts
