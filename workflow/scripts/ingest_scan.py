"""Rule ingest_scan: DICOM series (or volume file) -> ct.nii.gz (HU) + scan.json.

params.cfg is the cohort config's ``ingest`` section (series rule, uneven slices).
"""
from qctfea import steps_imaging
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_imaging.ingest(source=sm.input[0], out_image=sm.output.image,
                                          out_json=sm.output.json, context=context(sm.wildcards),
                                          cfg=sm.params.cfg))
