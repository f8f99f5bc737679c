# Developer and CI entry points for pyoverlay. Every target works from any directory
# (make -C path/to/repo TARGET) and sets the machine up first where it needs to.
#
#   make demo    bootstrap, then mount the built-in example and show it (needs root)
#   make test    bootstrap, ruff lint + format check, then the default pytest run
#   make soak    the long runs (pytest -m soak)
#   make bench   bench/run.py
#   make clean   build output and caches (keeps the venv; `make distclean` removes it too)
#
# Variables: PYOVERLAY_VENV (venv, default REPO/.venv), PYTEST_ARGS, BENCH_ARGS.

REPO := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PYOVERLAY_VENV ?= $(REPO)/.venv
override PYOVERLAY_VENV := $(abspath $(PYOVERLAY_VENV))
export PYOVERLAY_VENV

PY := $(PYOVERLAY_VENV)/bin/python
RUFF := $(PYOVERLAY_VENV)/bin/ruff
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Both checks always run, so one pass reports every problem.
LINT = ( "$(RUFF)" check .; rc=$$?; "$(RUFF)" format --check . || rc=1; exit $$rc )

.PHONY: help bootstrap demo test lint soak bench clean distclean
.NOTPARALLEL:

help:
	@sed -n 's/^#   //p' "$(REPO)/Makefile"

bootstrap:
	@bash "$(REPO)/scripts/bootstrap.sh"

demo: bootstrap
	@bash "$(REPO)/scripts/demo.sh"

lint: bootstrap
	cd "$(REPO)" && $(LINT)

# Lint and tests both run, so one report shows every problem; either failing fails the target.
test: bootstrap
	@cd "$(REPO)" && lint=0 && { $(LINT) || lint=$$?; } && \
	{ "$(PY)" -m pytest $(PYTEST_ARGS) || exit $$?; } && \
	if [ "$$lint" -ne 0 ]; then echo "make test: ruff found problems (see above)" >&2; exit 1; fi

soak: bootstrap
	cd "$(REPO)" && "$(PY)" -m pytest -m soak $(PYTEST_ARGS)

bench: bootstrap
	cd "$(REPO)" && "$(PY)" bench/run.py $(BENCH_ARGS)

clean:
	cd "$(REPO)" && rm -rf build .pytest_cache .ruff_cache .hypothesis *.egg-info \
		pyoverlay/_native*.so
	cd "$(REPO)" && find . -path ./.git -prune -o -path ./.venv -prune -o \
		-name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	if [ -f "$(PYOVERLAY_VENV)/pyvenv.cfg" ]; then rm -rf "$(PYOVERLAY_VENV)"; fi
