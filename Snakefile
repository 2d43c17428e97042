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
include: "workflow/rules/cohort.smk"


rule all:
    input:
        get_final_outputs,
