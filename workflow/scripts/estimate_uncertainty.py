"""Rule estimate_uncertainty: intervals and per-scan SDs of the scan's outcomes."""
from qctfea.steps import fea as steps_fea
from qctfea.workflow_glue import context, optional_input, run_step

sm = snakemake  # noqa: F821
w = sm.wildcards
run_step(sm, lambda: steps_fea.uncertainty(
         calibration_json=sm.input.calibration, bmd_json=sm.input.bmd,
         density_path=sm.input.density, parts_path=sm.input.parts,
         strength_json=sm.input.strength, screws_path=optional_input(sm, "screws"),
         registration_json=optional_input(sm, "registration"), out_json=sm.output.json,
         cfg=sm.params.cfg, materials_cfg=sm.params.materials, bmd_cfg=sm.params.bmd,
         context=context(w), seed_key=f"{w.patient}/{w.timepoint}",
         record_failure=True))
