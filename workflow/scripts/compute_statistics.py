"""Rule compute_statistics: paired tests, Friedman, mixed models, correlations, summary.json."""
from pathlib import Path

from qctfea.cohort import analysis as cohort
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: cohort.statistics(sm.input.long, Path(sm.output.summary).parent,
                                       exclusions_csv=sm.input.exclusions))
