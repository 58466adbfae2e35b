# Two-command quickstart: `make demo` and `make test`. Both build their own
# virtualenv in .venv from nothing but the system python3.11.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/proctor demo

# Static checks: ruff (defects, not style) on everything; mypy strict on the core and the stages.
lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench examples
	$(BIN)/mypy

test: $(STAMP) lint
	@command -v curl >/dev/null || { echo "make test: curl is required for the proxy tests (apt-get install curl)"; exit 1; }
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		echo "make test: installing Debian's chromium and chromium-driver (console browser tests)"; \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v iptables-restore >/dev/null && command -v nft >/dev/null && command -v ip >/dev/null || { \
		echo "make test: installing iptables, nftables and iproute2 (proctor netsetup in network namespaces)"; \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables nftables iproute2; }
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .proctor build *.egg-info
