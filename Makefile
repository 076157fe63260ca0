# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SRC    := stream_distill tests benchmarks examples
PYTEST_ARGS ?=

.PHONY: setup tools demo test lint typecheck unit clean

setup: $(STAMP)

# torch is pinned and installed first: a looser pin would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# promtool (Debian's `prometheus` package) checks deploy/prometheus in the tests, and headless
# chromium loads /dashboard. Installed only when missing; where they cannot be (no root, no apt),
# those tests skip and say why (under CI=true the dashboard test fails instead).
tools:
	@command -v promtool >/dev/null 2>&1 || { \
		apt-get update -qq >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus >/dev/null 2>&1; \
	} || echo "promtool not installed (apt-get install prometheus): its tests will skip" >&2
	@test -x /usr/bin/chromium || { \
		apt-get update -qq >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium >/dev/null 2>&1; \
	} || echo "chromium not installed (apt-get install chromium): the dashboard test will skip" >&2

demo: setup
	$(VENV)/bin/stream-distill demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)

typecheck: setup
	$(VENV)/bin/mypy stream_distill

unit: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test: tools lint typecheck unit

clean:
	rm -rf $(VENV) .sd .mypy_cache .ruff_cache .pytest_cache
