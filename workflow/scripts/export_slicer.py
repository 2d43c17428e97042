"""Rule export_slicer: a scan's screws (markups, STL) and vertebra surface (STL) for 3D
Slicer, in its scanner's LPS coordinates; a registered follow-up's are its baseline model's
carried by registration.tfm (docs/slicer.md)."""
from pathlib import Path

from qctfea.qc import slicer
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: slicer.export_scan(sm.input.screws, sm.input.parts,
                                        Path(sm.output.markups).parent,
                                        context(sm.wildcards),
                                        sm.input.transform or None))
