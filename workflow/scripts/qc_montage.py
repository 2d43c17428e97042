"""Rule qc_montage: one per-scan QC picture kind in a patients x timepoints grid."""
from pathlib import Path

from qctfea.qc import figures
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
# One picture per kept scan: results/<cohort>/<patient>/<timepoint>/<picture>. Picked from
# the inputs by name: the planning checkpoint's files are among them too.
entries = [(Path(f).parent.parent.name, Path(f).parent.name, f) for f in sm.input
           if Path(f).name == sm.params.picture]
run_step(sm, lambda: figures.qc_montage(
    entries, {"png": sm.output.png, "svg": sm.output.svg},
    f"QC: {sm.wildcards.kind} (patients x timepoints)", sm.params.timepoints))
