"""Rule ingest_scan (a checkpoint): DICOM series (or volume file) -> ct.nii.gz (HU) +
scan.json; the label map checked to hold the vertebra. A scan that cannot be read is recorded
(refused) for accept_scan.

params.cfg is the cohort config's ``ingest`` section (series rule, uneven slices),
params.mask its ``mask`` section (the target vertebra), params.series_uid the sample sheet's
series_uid (None: the only series, or the series rule).
"""
from qctfea.steps import imaging as steps_imaging
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_imaging.ingest(
    source=sm.input.image, out_image=sm.output.image, out_json=sm.output.json,
    context=context(sm.wildcards), series_uid=sm.params.series_uid, cfg=sm.params.cfg,
    labels_path=sm.input.labels,
    mask_cfg=sm.params.mask, record_refusal=True))
