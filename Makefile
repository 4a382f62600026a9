# Both targets build their own virtual environment first, so a fresh machine needs nothing else.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test bench venv system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; a range would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Real servers the tests start on free ports (Redis) and the browser the console's tests drive
# (Chromium), from Debian's packages. Best effort: without root or apt the tests that need them
# skip and say why.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing from Debian's packages"; \
			apt-get install -y -q $$missing >/dev/null 2>&1 || \
			(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null 2>&1) || \
			echo "could not install$$missing: their tests will skip"; \
		else echo "no root or apt-get: not installing$$missing; their tests will skip"; fi; \
	fi

serve: $(STAMP)
	$(VENV)/bin/plumbline serve $(ARGS)

test: $(STAMP) system-deps
	$(VENV)/bin/python -m pytest -q --durations=25 $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.engine_throughput $(ARGS)
