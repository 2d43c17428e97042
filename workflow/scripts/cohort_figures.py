"""Rule cohort_figures: spaghetti and scatter figures (PNG + SVG) from the long table."""
from pathlib import Path

from qctfea.qc import figures
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: figures.cohort_figures(sm.input[0], Path(sm.output.png[0]).parent,
                                            cases=sm.params.cases))
