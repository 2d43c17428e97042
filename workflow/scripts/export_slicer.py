"""Rule export_slicer: a model's screws (markups, STL) and vertebra surface (STL) for 3D
Slicer, in the scanner's LPS coordinates (docs/slicer.md)."""
from pathlib import Path

from qctfea.qc import slicer
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: slicer.export_scan(sm.input.screws, sm.input.parts,
                                        Path(sm.output.markups).parent,
                                        context(sm.wildcards)))
