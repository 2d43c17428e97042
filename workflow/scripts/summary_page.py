"""Rule summary_page: self-contained HTML page with the headline findings, tables and figures."""
from qctfea.qc import report
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: report.summary_page(
    sm.input.summary, sm.params.tables, sm.params.stats,
    [*sm.input.figures, *sm.input.qc], sm.output[0], sm.params.cohort,
    patient_pages=sm.params.patients))
