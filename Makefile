# kdbook: two commands for a newcomer.
#   make book   set up (once) and build the book into _build/html   [PROFILE=smoke|quick|paper ARGS="-p seed 1"]
#               (no PROFILE: each chapter at the profile profiles.yml publishes it at)
#   make test   set up (once) and run nbdev-test on every chapter + pytest tests/ (book build + browser check)
# Setup is idempotent: a stamp file keyed by a hash of the requirements and pyproject.toml skips it on re-runs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?=
ARGS ?=

# Offline datasets: ../shared/datasets next to the repository when it exists (override with KDBOOK_DATASETS=...).
ifeq ($(origin KDBOOK_DATASETS),undefined)
  ifneq ($(wildcard ../shared/datasets),)
    export KDBOOK_DATASETS := $(abspath ../shared/datasets)
  endif
endif

BOOK_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
TEST_HASH := $(shell cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -c1-12)
BOOK_STAMP := $(VENV)/.kdbook-book-$(BOOK_HASH)
TEST_STAMP := $(VENV)/.kdbook-test-$(TEST_HASH)

.PHONY: book test setup setup-test clean environment nbdev-test-only pytest-only gpu gpu-import sweep lease

book: $(BOOK_STAMP)
	$(BIN)/python tools/build_book.py $(if $(PROFILE),--profile $(PROFILE)) $(ARGS)

test: $(TEST_STAMP)
	$(MAKE) -s nbdev-test-only
	$(MAKE) -s pytest-only

# The two halves of `make test` (no setup; .ci/run times them separately).
nbdev-test-only:
	$(BIN)/nbdev-test
# pytest on every core where there are 4 or more (tests/conftest.py keeps each shared fixture on one worker). On
# 2 cores the book build's two jobs and the torch tests already fill both, and xdist measured slower (949 s vs 692 s).
XDIST := $(shell [ "$$(nproc 2>/dev/null || echo 1)" -ge 4 ] && echo "-n auto --dist loadgroup")
pytest-only:
	rc=0; $(BIN)/python -m pytest tests/ -v --durations=40 $(XDIST) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 5; fi; exit $$rc

setup: $(BOOK_STAMP)
setup-test: $(TEST_STAMP)

$(BOOK_STAMP):
	@echo "== setup: virtual environment $(VENV) (requirements.txt) =="
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -r requirements.txt  # no bytecode for all of torch up front:
	# Python compiles (and caches) only the modules a run imports, which halves the install (torch: 96 s -> 42 s here)
	$(BIN)/python -m pip install -q -e . --no-deps
	$(BIN)/python -m ipykernel install --sys-prefix --name kdbook --display-name kdbook
	rm -f $(VENV)/.kdbook-book-*
	touch $@

$(TEST_STAMP): $(BOOK_STAMP)
	@echo "== setup: test requirements and Chromium =="
	$(BIN)/python -m pip install -q --no-compile -r requirements-test.txt
	if [ ! -x /usr/bin/chromium ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; fi
	rm -f $(VENV)/.kdbook-test-*
	touch $@

environment:
	$(BIN)/python tools/sync_environment.py

clean:
	rm -rf _build

# Owed GPU work (tools/owed.py, tools/sweep.py). No setup step: a borrowed GPU machine has no .venv,
# so these use the venv's python when there is one and python3 otherwise.
#   make gpu BUDGET_MIN=8 [CHAPTERS=a,b] [OUT=dir] [PROFILE=p]   run the owed chapters within the budget,
#                                                  export new records/weights/checkpoints into OUT (<= 8 files)
#   make gpu-import ARCHIVE=dir-or-tarball         verify and merge an archive written by make gpu
#   make sweep PROFILE=paper EXECUTOR=slurm|local  one submitit job per owed chapter, no deadline
#   make lease BUDGET_MIN=9 [CHAPTERS=a,b] [PROFILE=p] [PROBE='cmd'] [DATASETS=CIFAR100-JPEG,MNIST]
#                                                  prepare .bundle/ (datasets, wheels) here and print the one
#                                                  command + carry list to run on a borrowed GPU machine
PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
BUDGET_MIN ?= 8
CHAPTERS ?=
OUT ?= _build/owed
ARCHIVE ?=
EXECUTOR ?= local
PROBE ?=
DATASETS ?=

gpu:
	$(PY) tools/owed.py run --budget-min $(BUDGET_MIN) --out $(OUT) $(if $(CHAPTERS),--chapters $(CHAPTERS)) $(if $(PROFILE),--profile $(PROFILE))

gpu-import:
	@test -n "$(ARCHIVE)" || { echo "error: give ARCHIVE=<the folder written by make gpu OUT=..., or its .tar.gz>" >&2; exit 2; }
	$(PY) tools/owed.py import $(ARCHIVE)

sweep:
	$(PY) tools/sweep.py --executor $(EXECUTOR) $(if $(PROFILE),--profile $(PROFILE)) $(if $(CHAPTERS),--chapters $(CHAPTERS))

lease:
	$(PY) tools/lease.py --budget-min $(BUDGET_MIN) $(if $(CHAPTERS),--chapters $(CHAPTERS)) $(if $(PROFILE),--profile $(PROFILE)) $(if $(PROBE),--probe '$(PROBE)') $(if $(DATASETS),--datasets $(DATASETS))
