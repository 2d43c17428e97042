# qctfea: longitudinal QCT finite element analysis of L4 with pedicle screws.
# Table of contents; the rules live in workflow/rules, the science in src/qctfea.
import sys

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/imaging.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/solve.smk"
include: "workflow/rules/uncertainty.smk"
include: "workflow/rules/cohort.smk"


rule all:
    input:
        get_final_outputs,


# A local run schedules without Snakemake's job-rate limiter, whose re-evaluation timers
# multiply while jobs wait for cores (qctfea.workflow_glue.without_job_rate_limit).
onstart:
    if without_job_rate_limit(workflow):
        print("qctfea: local run, Snakemake's job-rate limiter off", file=sys.stderr)


# After a failed run (e.g. with --keep-going): one line per failed job, naming the scan and
# its error, in logs/<cohort>/failures.txt; a successful run removes a stale one.
onerror:
    write_failure_summary(log, FAILURES)


onsuccess:
    Path(FAILURES).unlink(missing_ok=True)
