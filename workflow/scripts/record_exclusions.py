"""Rule record_exclusions: the cohort config's `exclude` entries -> tables/exclusions.csv."""
from qctfea import cohort
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: cohort.write_exclusions(sm.params.excluded, sm.output[0]))
