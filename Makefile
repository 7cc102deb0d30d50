# The two commands: `make demo` and `make test`. Each creates .venv and installs what is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mm1 demo

# The report's browser test drives Debian's chromium through chromedriver: installed when missing
# (apt-get, as root or through sudo without a password); without them that test fails, saying so.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  $$SUDO sh -c '$(APT_INSTALL) >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && $(APT_INSTALL) >/dev/null 2>&1)' \
	  || echo "make: could not install chromium and chromium-driver (apt-get); the report's browser test will fail"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m tools.bench.partition_memory

clean:
	rm -rf $(VENV) build demo_out
