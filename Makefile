# Everything runs inside one virtual environment, re-installed only when the pins or setup.cfg change.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= outputs/demo

.PHONY: install test lint demo lock clean

$(STAMP): requirements.lock setup.cfg
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
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
