# qctfea: longitudinal QCT finite element analysis of L4 with pedicle screws.
# Table of contents; the rules live in workflow/rules, the science in src/qctfea.
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


# After a failed run (e.g. with --keep-going): one line per failed job, naming the scan and
# its error, in logs/<cohort>/failures.txt; a successful run removes a stale one.
onerror:
    write_failure_summary(log, FAILURES)


onsuccess:
    Path(FAILURES).unlink(missing_ok=True)
