# The two commands: `make demo` and `make test` (both build the environment first).
SHELL := /bin/bash
VENV ?= .venv
CORES ?= 2
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export OMP_NUM_THREADS ?= 1
export MPLBACKEND ?= Agg

.PHONY: env demo demo-study dryrun test lint config clean peer-env

env:
	@bash envs/bootstrap.sh

demo: env
	@echo "[demo] running the workflow on the demo cohort (4 patients x 3 timepoints, $(CORES) cores)"
	@start=$$(date +%s); \
	snakemake --cores $(CORES) --config cohort=demo --printshellcmds --show-failed-logs; \
	rc=$$?; echo "[demo] workflow finished in $$(( $$(date +%s) - start )) s (exit $$rc)"; \
	[ $$rc = 0 ] || exit $$rc; \
	snakemake --config cohort=demo --report results/demo/report.html > logs/demo/report.log 2>&1; \
	rc=$$?; [ $$rc = 0 ] || { tail -20 logs/demo/report.log; exit $$rc; }; \
	echo "[demo] results: results/demo/{tables,stats,figures}/, summary page results/demo/report/summary.html"; \
	echo "[demo] Snakemake report (figures, tables, method of every rule): results/demo/report.html"

demo-study: env
	snakemake --cores $(CORES) --config cohort=demo-study --show-failed-logs

dryrun: env
	snakemake -n --config cohort=demo

# The workflow's static checks (both also run by `make test`, tests/test_workflow.py).
lint: env
	snakemake --lint --config cohort=demo
	snakefmt --check Snakefile workflow/rules

# The cohort schema and config/README.md's option table, from the parameter classes
# (src/qctfea/config.py); tests/test_schema.py fails until they are regenerated.
config: env
	python -m qctfea.config --write

# The suite as two pytest processes at once (tests/run_suite.sh says which and why);
# `python -m pytest` runs it as one.
test: env
	@echo "[test] running the test suite"
	@bash tests/run_suite.sh

# The peer solver for `qctfea-bench peer`: parosol-py (GPL-2.0-or-later, bundles ParOSol and
# OpenMPI) in its own environment, called as a program; never a dependency of qctfea.
PEER_VENV ?= .peer-venv
peer-env: env
	@if [ -x $(PEER_VENV)/bin/python ] && $(PEER_VENV)/bin/python -c "import parosol_py" 2>/dev/null; then \
	  echo "[peer-env] $(PEER_VENV) has parosol-py"; else \
	  echo "[peer-env] creating $(PEER_VENV) with parosol-py==0.1.26"; \
	  $$($(VENV)/bin/python -c "import sys; print(sys.executable)") -m venv $(PEER_VENV) && \
	  $(PEER_VENV)/bin/pip install --quiet "parosol-py==0.1.26"; fi

clean:
	rm -rf results logs benchmarks resources .snakemake
