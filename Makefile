# Two commands for a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
HELM := $(VENV)/bin/helm
PROMETHEUS := $(VENV)/bin/prometheus

.PHONY: setup test demo proto manifests bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements-dev.txt -c constraints.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

$(HELM): $(STAMP) hack/install-helm.sh
	VENV=$(VENV) sh hack/install-helm.sh

# Debian's Prometheus server, for the test that evaluates the chart's queries (skipped without it).
$(PROMETHEUS): $(STAMP) hack/install-prometheus.sh
	VENV=$(VENV) sh hack/install-prometheus.sh

test: setup $(HELM) $(PROMETHEUS)
	$(PY) -m pytest -q

demo: setup
	$(PY) hack/demo.py

manifests: setup $(HELM)
	$(PY) hack/render_manifests.py

proto: setup
	$(PY) proto/codegen.py

clean:
	rm -rf $(VENV) .pytest_cache
