"""Rule patient_page: one self-contained HTML page per patient (results, pictures, 3D model)."""
from pathlib import Path

from qctfea.qc import patient_page
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
# results/<cohort>/report/patients/<patient>.html -> results/<cohort>
res = Path(sm.output[0]).parent.parent.parent
run_step(sm, lambda: patient_page.write_patient_page(
    res, sm.wildcards.patient, sm.output[0], cohort_name=sm.params.cohort,
    long_csv=sm.input.long, exclusions_csv=sm.input.exclusions,
    model_timepoint=sm.params.model_timepoint or None))
