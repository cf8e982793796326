# Everything runs inside one virtual environment, re-installed only when the pins or setup.cfg change.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= outputs/demo

.PHONY: install test lint demo lock clean

# The pinned torch is a CUDA build: the environment takes about 6 GB. Check the disk first, so a full disk is
# one clear message instead of a half-written venv; --no-cache-dir keeps pip from storing a second copy.
NEED_GB ?= 7
PIP := $(PY) -m pip install -q --disable-pip-version-check --no-cache-dir

$(STAMP): requirements.lock setup.cfg
	@if [ ! -x $(PY) ]; then free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge $(NEED_GB) ] || \
	  { echo "make install: $$free GB free under $$(pwd); a new $(VENV) needs about $(NEED_GB) GB" >&2; exit 1; }; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -r requirements.lock
	$(PIP) --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests experiments

demo: install
	$(PY) -m anchor_clip.demo --out $(OUT)

lock: install
	(echo "# Exact versions every machine installs (pip install -r requirements.lock); regenerate with 'make lock'."; \
	 $(PY) -m pip freeze --exclude-editable) > requirements.lock

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
