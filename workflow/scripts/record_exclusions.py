"""Rule record_exclusions: the cohort config's `exclude` entries and the scans whose screws
were refused at planning -> tables/exclusions.csv."""
from qctfea.cohort import exclusions
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: exclusions.write_exclusions(
    list(sm.params.excluded) + exclusions.refusal_entries(sm.params.scans), sm.output[0]))
