# The README's two set-up commands: `make demo` and `make test`. Both create .venv on first use.
# CONSTRAINTS pins torch/torchvision to the releases on the development machines' disk; elsewhere: make demo CONSTRAINTS=
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install demo test fuzz lint clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cxr demo

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: install
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The hypothesis fuzz tests with thousands of examples per property (CI runs a few hundred in `make test`).
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
