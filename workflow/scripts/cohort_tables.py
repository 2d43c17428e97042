"""Rule cohort_tables: long table -> wide, change from baseline, summary per timepoint, Table 1."""
from pathlib import Path

from qctfea.cohort import analysis as cohort
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: cohort.tables(sm.input[0], Path(sm.output.wide).parent))
