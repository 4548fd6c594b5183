# Every target bootstraps what it needs: apt packages (when root and missing) and the venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv demo test lint e2e faults bench bench-quick package clean

help:
	@echo "make demo         run the daemon in the foreground on the bundled demo programs"
	@echo "make test         the fast test suite (lint + pytest)"
	@echo "make e2e          packages + systemd end-to-end tests (root, minutes)"
	@echo "make faults       the fault, load and hostile-input suite"
	@echo "make bench        benchmark against supervisord, circus, systemd and the floor (~25 min)"
	@echo "make bench-quick  the CI-sized benchmark (under a minute; fails on a regressed ratio)"
	@echo "make package      build the .deb and .rpm into dist/"

$(STAMP): pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) bash scripts/bootstrap.sh $(VENV)
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m ocp_agentd.demo.config .demo
	$(VENV)/bin/ocp-agentd --config .demo/demo.toml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The fast suite mostly waits on daemons and programs, so it runs on TEST_WORKERS pytest-xdist
# workers (tests are independent: free ports, tmp dirs, uuid names); TEST_WORKERS=0 runs it
# in this process. Tests marked xdist_group share one worker.
TEST_WORKERS ?= 3
test: $(STAMP) lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

# The benchmark runs ocp-agentd and ocp-agentctl from this tree as an installed copy runs:
# from bytecode (pip and the packages compile every module; an editable install does not,
# and with PYTHONDONTWRITEBYTECODE set each command would compile its sources again).
bench: $(STAMP)
	$(PY) -m compileall -q ocp_agentd
	$(PY) -m bench.run

bench-quick: $(STAMP)
	$(PY) -m compileall -q ocp_agentd
	$(PY) -m bench.run --quick

faults: $(STAMP)
	$(VENV)/bin/pytest -m faults tests/faults -p no:cacheprovider -rs --timeout=300

package: $(STAMP)
	bash packaging/build.sh

e2e: $(STAMP)
	$(VENV)/bin/pytest -m e2e tests/e2e -p no:cacheprovider -rs -v -s --timeout=1200

clean:
	rm -rf $(VENV) .demo dist build *.egg-info
