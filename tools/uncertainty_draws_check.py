"""How much a scan's intervals and per-scan SDs move from seed to seed: the uncertainty
step's quasi-random draws (scrambled Sobol', qctfea.uncertainty.QuasiRandom) against
independent pseudo-random draws (numpy's default generator) of the same number, on one
scan's results folder (calibration.json, bmd.json, density.nii.gz, vertebra.nii.gz,
strength.json, screws.json). Writes a markdown table (docs/uncertainty.md, "Draws").

    .venv/bin/python tools/uncertainty_draws_check.py results/totalseg-l1/T01/M00 \
        --seeds 16 --out-md /tmp/draws.md
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from qctfea import uncertainty as unc
from qctfea.mdtable import pipe_table
from qctfea.steps import fea as steps_fea

OUTCOMES = {"trabecular_vbmd_mg_cm3": "trabecular vBMD",
            "compression_strength_n": "compression strength",
            "pullout_strength_left_n": "pullout strength, left",
            "around_screw_vbmd_left_mg_cm3": "vBMD around the left screw"}


def scan_inputs(scan: Path) -> tuple[unc.UncertaintyParams, unc.ScanInputs]:
    """The step's parameters and inputs for ``scan``, as the workflow builds them."""
    got = {}
    real = unc.scan_uncertainty

    def keep(p, inp, seed_key=""):
        got["p"], got["inp"] = p, inp
        return real(p, inp, seed_key)

    unc.scan_uncertainty = keep
    try:
        steps_fea.uncertainty(
            calibration_json=scan / "calibration.json", bmd_json=scan / "bmd.json",
            density_path=scan / "density.nii.gz", parts_path=scan / "vertebra.nii.gz",
            strength_json=scan / "strength.json", screws_path=scan / "screws.json",
            registration_json=None, out_json=Path("/tmp/uncertainty_draws_check.json"),
            cfg={}, materials_cfg={}, bmd_cfg={}, context=str(scan), seed_key="x")
    finally:
        unc.scan_uncertainty = real
    return got["p"], got["inp"]


def spreads(p, inp, seeds: int, sampler) -> dict:
    """Per outcome: the mean SD, and the seed-to-seed SD of ci_low, ci_high (in units of
    the SD) and of sd_scan (relative)."""
    real = unc.QuasiRandom
    unc.QuasiRandom = sampler
    try:
        runs = [unc.scan_uncertainty(p, inp, f"seed{k}") for k in range(seeds)]
    finally:
        unc.QuasiRandom = real
    out = {}
    for key in OUTCOMES:
        a = np.array([[r[key]["ci_low"], r[key]["ci_high"], r[key]["sd"], r[key]["sd_scan"]]
                      for r in runs])
        sd = a[:, 2].mean()
        out[key] = (sd, a[:, 0].std(ddof=1) / sd, a[:, 1].std(ddof=1) / sd,
                    a[:, 3].std(ddof=1) / a[:, 3].mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scan", type=Path, help="a scan's results folder")
    ap.add_argument("--seeds", type=int, default=16, help="seed keys per sampler")
    ap.add_argument("--draws", type=int, nargs="+", default=[512],
                    help="draws per scan (the step rounds them up to a power of 2)")
    ap.add_argument("--out-md", type=Path, required=True)
    a = ap.parse_args()
    p0, inp = scan_inputs(a.scan)
    rows = []
    for draws in a.draws:
        p = dataclasses.replace(p0, draws=draws)
        for name, sampler in (("scrambled Sobol' (the step)", unc.QuasiRandom),
                              ("pseudo-random", lambda n, rng: rng)):
            res = spreads(p, inp, a.seeds, sampler)
            for key, (sd, lo, hi, scan_sd) in res.items():
                rows.append([name, unc.sobol_size(draws), OUTCOMES[key], f"{sd:.3g}",
                             f"{lo:.3f}", f"{hi:.3f}", f"{100 * scan_sd:.1f}"])
            print(name, draws, "done", flush=True)
    a.out_md.write_text(pipe_table(
        ["sampler", "draws", "outcome", "SD", "ci_low spread (SD)", "ci_high spread (SD)",
         "sd_scan spread (%)"], rows, "lrlrrrr") + "\n", encoding="utf-8")
    print(a.out_md.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
