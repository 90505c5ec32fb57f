# The two commands a new machine needs: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Only the default-feature clippy (and maturin) compile PyO3, whose build script reads an
# interpreter's version and configuration: pin it to the venv's, so clippy checks the code
# maturin builds whatever `python3` is on PATH (another interpreter would rebuild PyO3).
# The crate's tests build without Python and link no libpython.
export PYO3_PYTHON := $(abspath $(PY))

.DEFAULT_GOAL := help

.PHONY: help ## show the targets
help:
	@grep -E '^\.PHONY: [a-z-]+ ##' Makefile | sed -E 's/^\.PHONY: ([a-z-]+) ## (.*)/  \1\t\2/'

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.PHONY: install ## create .venv with the development tools
install: $(VENV)/.installed

# Ray (240 MB) only for the tests that use it.
$(VENV)/.ray: $(VENV)/.installed requirements-ray.txt
	$(PY) -m pip install -q -r requirements-ray.txt
	touch $@

# pyarrow (the parquet and export extras), and polars and datasets, which
# tests/test_parquet_output.py loads the files with. Not torch (the slime extra): PyPI's
# x86_64 build is the CUDA one, over 1 GB with its libraries; the test that loads a slime
# .pt with torch runs where torch is installed.
$(VENV)/.parquet: $(VENV)/.installed requirements-parquet.txt
	$(PY) -m pip install -q -r requirements-parquet.txt
	touch $@

# matplotlib for the HTML page of `dualsample report` (the report extra).
$(VENV)/.report: $(VENV)/.installed requirements-report.txt
	$(PY) -m pip install -q -r requirements-report.txt
	touch $@

# A real browser to render that page in tests/test_report.py: Debian's chromium, installed
# once (as root, as on CI) when it is not on PATH.
$(VENV)/.chromium: $(VENV)/.installed
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $@

# zig and auditwheel for `make wheel`.
$(VENV)/.wheel: $(VENV)/.installed requirements-wheel.txt
	$(PY) -m pip install -q -r requirements-wheel.txt
	touch $@

# The extension is built for the stable ABI (_core.abi3.so); Python would import a
# _core.cpython-*.so that an older build left beside it first, so each build removes it.
DROP_VERSIONED_CORE := rm -f python/dualsample_rs/_core.cpython-*.so

.PHONY: build-dev ## build the extension in debug mode into .venv
build-dev: install
	$(DROP_VERSIONED_CORE)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop

.PHONY: build-prod ## build the extension in release mode into .venv
build-prod: install
	$(DROP_VERSIONED_CORE)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release

.PHONY: format ## format Rust and Python
format: install
	cargo fmt
	$(VENV)/bin/ruff format python tests benches examples
	$(VENV)/bin/ruff check --fix python tests benches examples

.PHONY: lint-source ## cargo fmt --check, clippy (with and without the python feature), ruff, mypy: no build needed
lint-source: install
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --no-default-features -- -D warnings
	$(VENV)/bin/ruff check python tests benches examples
	$(VENV)/bin/ruff format --check python tests benches examples
	$(PY) -m mypy python/dualsample_rs

.PHONY: lint ## lint-source, and stubtest of the compiled module's stubs (release build)
lint: build-prod lint-source
	$(PY) -m mypy.stubtest dualsample_rs._core

.PHONY: test-rust ## the crate's unit tests (kernels and wire readers, plain Rust: no Python needed)
test-rust:
	cargo test --no-default-features

# The inner loop, on a debug build. The tests marked slow (the statistical ones over
# thousands of samples, those that need Ray, end-to-end runs of 5 s or more), the benches
# and stubtest wait for `make test`. The extension is built in its own target directory:
# maturin builds pyo3 for an extension module and cargo test for a linked libpython, and
# in one directory each would rebuild pyo3 and the crate after the other (~25 s a run).
.PHONY: check ## the fast loop: debug build, lint, cargo test, pytest without slow tests, Ray or benches
check: install $(VENV)/.parquet $(VENV)/.report test-rust lint-source
	$(DROP_VERSIONED_CORE)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --target-dir target/extension
	$(PY) -m pytest -q -m "not slow" -n auto tests

.PHONY: test ## build once (release), then every check: lint, cargo test, pytest with the slow tests on every core (benches run once)
test: build-prod wheel $(VENV)/.ray $(VENV)/.parquet $(VENV)/.report $(VENV)/.chromium lint test-rust
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -n auto --durations=10 tests
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -n auto benches

# The release files: the sdist, then the wheel built from the unpacked sdist (so that every
# wheel shows the sdist builds), for the stable ABI of CPython 3.10 (one wheel for 3.10 and
# later) and manylinux_2_17, the oldest glibc Rust's x86_64-unknown-linux-gnu supports: zig
# links it against glibc 2.17's symbols. `auditwheel show` must find the wheel consistent
# with that tag. tests/test_wheel.py installs it into clean environments. Its own target
# directory, so that it and build-prod do not rebuild each other; the sources are unpacked
# with the time of unpacking (tar -m), since the sdist stamps every file with one fixed
# date, which would leave cargo to take an older build of other sources for fresh.
WHEEL_PLATFORM := manylinux_2_17_x86_64

.PHONY: wheel ## the sdist and an abi3 manylinux_2_17 wheel built from it, in dist/, checked by auditwheel
wheel: $(VENV)/.wheel
	rm -rf dist target/sdist
	$(VENV)/bin/maturin sdist --out dist
	mkdir -p target/sdist
	tar -xzmf dist/*.tar.gz -C target/sdist
	cd target/sdist/dualsample_rs-* && PATH="$(abspath $(VENV))/bin:$$PATH" $(abspath $(VENV))/bin/maturin build \
		--release --locked --zig --compatibility $(WHEEL_PLATFORM) --target-dir $(abspath target/wheel) --out $(abspath dist)
	$(VENV)/bin/auditwheel show dist/*.whl | tee target/auditwheel.txt
	tr -s ' \n' ' ' < target/auditwheel.txt | grep -q 'consistent with the following platform tag: "$(WHEEL_PLATFORM)"'
	@ls -l dist

# The extension built for .venv's interpreter only (not abi3), which benches/bench_abi3.py
# puts beside the abi3 one when DUALSAMPLE_PER_VERSION names its folder (as `make bench` does).
PER_VERSION := target/per-version

.PHONY: per-version ## build the extension without abi3 (for .venv's Python only) into target/per-version, for the benches
per-version: install
	rm -rf $(PER_VERSION)/dist $(PER_VERSION)/pkg
	$(VENV)/bin/maturin build --release --locked --no-default-features --features python \
		--target-dir $(PER_VERSION) --out $(PER_VERSION)/dist
	$(PY) -m zipfile -e $(PER_VERSION)/dist/*.whl $(PER_VERSION)/pkg

# The commit whose package the benches put beside the current one (the last with the
# hand-written HTTP client); `make previous` checks it out into .bench-previous.
PREVIOUS ?= de326a7
PREVIOUS_PKG := $(abspath .bench-previous/python/dualsample_rs)

.PHONY: previous ## check out $(PREVIOUS) beside this tree for the benches' "previous" cases
previous: build-prod
	test -d .bench-previous || git worktree add --detach .bench-previous $(PREVIOUS)
	cp python/dualsample_rs/_core*.so $(PREVIOUS_PKG)/

.PHONY: test-engines ## the package against real vLLM (CPU build) and SGLang; installs them once under ~/.cache/dualsample_rs
test-engines: build-prod
	bash tests/engines/install_vllm.sh
	bash tests/engines/install_sglang.sh
	DUALSAMPLE_ENGINES=1 $(PY) -m pytest -q -p no:randomly -o timeout=1800 tests/engines

# The engines and models of test-engines; sizes and targets from DUALSAMPLE_BENCH_* (see the
# script's docstring), e.g. DUALSAMPLE_BENCH_SMALL=1 for a quick pass over every path.
.PHONY: bench-engines ## q* tokens/s against plain generation on real vLLM (CPU build) and SGLang, one table per engine
bench-engines: build-prod
	bash tests/engines/install_vllm.sh
	bash tests/engines/install_sglang.sh
	DUALSAMPLE_BENCH_PREVIOUS=$${DUALSAMPLE_BENCH_PREVIOUS-$(if $(wildcard $(PREVIOUS_PKG)/_core*.so),$(PREVIOUS_PKG),)} \
		$(PY) benches/engine_table.py

.PHONY: bench ## benchmark tables: Rust against the numpy reference on one core, then on all cores (release build)
bench: build-prod
	RAYON_NUM_THREADS=1 DUALSAMPLE_PREVIOUS=$(if $(wildcard $(PREVIOUS_PKG)/_core*.so),$(PREVIOUS_PKG),) \
		DUALSAMPLE_PER_VERSION=$(if $(wildcard $(PER_VERSION)/pkg/dualsample_rs/_core*.so),$(abspath $(PER_VERSION)/pkg/dualsample_rs),) \
		$(PY) -m pytest benches -q -p no:randomly --benchmark-enable --benchmark-sort=name
	$(PY) -m pytest benches/bench_kernels.py -q --benchmark-enable --benchmark-sort=name -k "rust and 1024"

.PHONY: demo ## build, start the reference servers, run the demo job
demo: build-prod
	$(PY) -m dualsample_rs demo

.PHONY: clean ## remove build products and the venv
clean:
	rm -rf target dist $(VENV) .pytest_cache .benchmarks
	git worktree remove --force .bench-previous 2>/dev/null || true
