"""Rule calibrate_density (a checkpoint): HU -> K2HPO4 density (mg/cm³). A calibration
refused by its gates is recorded (refused) for accept_calibration."""
from qctfea.steps import imaging as steps_imaging
from qctfea.workflow_glue import context, optional_input, run_step

sm = snakemake  # noqa: F821
# a follow-up's baseline calibration and scan records (calibration.phantomless.energy_from)
base = optional_input(sm, "baseline_calibration")
run_step(sm, lambda: steps_imaging.calibrate(
         ct_path=sm.input.ct, labels_path=sm.input.labels, out_density=sm.output.density,
         out_json=sm.output.json, out_png=sm.output.png, cfg=sm.params.cfg,
         context=context(sm.wildcards), label=sm.params.label,
         convention=sm.params.convention, record_refusal=True,
         baseline={"calibration": base, "scan": sm.input.baseline_scan,
                   "own_scan": sm.input.own_scan} if base else None))
