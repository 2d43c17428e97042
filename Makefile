# The two commands: `make demo` and `make test` (both build the environment first).
SHELL := /bin/bash
VENV ?= .venv
CORES ?= 2
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export OMP_NUM_THREADS ?= 1
export MPLBACKEND ?= Agg

.PHONY: env demo demo-study dryrun test lint clean

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

test: env
	@echo "[test] running the test suite"
	python -m pytest -ra --durations=10

clean:
	rm -rf results logs benchmarks resources .snakemake
