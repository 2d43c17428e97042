"""qctfea-bench: the benchmark and peer harness (outside the qctfea library).

Commands: ``benchmarks`` (per-rule time and memory of a workflow run), ``mesh-convergence``
(stiffness and strength against element size), ``perf`` (per-stage cost, iterations,
bandwidth bound, nonlinear cost in linear solves), ``peer`` (side by side with ParOSol),
``throughput`` (cohort wall time against mesh size). Each writes markdown for docs/.
"""
from __future__ import annotations

import argparse
import json
import sys

from qctfea import logs
from qctfea.errors import QctfeaError


# Long on purpose: a declaration, one block of arguments per harness command (perf, peer,
# throughput, mesh-convergence, benchmarks), read from top to bottom.
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qctfea-bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("benchmarks", help="per-rule wall time and peak memory of a workflow "
                       "run (Snakemake benchmark files) as a markdown table")
    s.add_argument("--root", required=True, help="benchmarks/<cohort>")
    s.add_argument("--out-md", required=True)
    s.add_argument("--out-json")

    s = sub.add_parser("mesh-convergence", help="one processed scan meshed at several sizes: "
                       "linear pullout and compression stiffness per level (markdown + JSON)")
    s.add_argument("--scan", required=True, help="results/<cohort>/<patient>/<timepoint>")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--out-md", required=True)
    s.add_argument("--sizes", type=float, nargs="+", default=[4.5, 3.0, 2.0, 1.5],
                   help="bone cell sizes (mm); screw cells are half")
    s.add_argument("--voxel-mm", type=float, default=0.5)
    s.add_argument("--ranks", type=int, default=2)
    s.add_argument("--strength", action="store_true",
                   help="also the nonlinear compression and pullout strength per level")
    s.add_argument("--loads", type=json.loads, default=None,
                   help="loads settings for the solves, as JSON (e.g. "
                        "'{\"nonlocal_length_mm\": null}'); default: the library's defaults")

    s = sub.add_parser("perf", help="benchmark harness: per-stage seconds, DOFs, iterations, "
                       "peak memory, triad bandwidth and bandwidth-bound ratio per mesh level "
                       "and MPI rank count (markdown + JSON)")
    s.add_argument("--scan", required=True, help="results/<cohort>/<patient>/<timepoint>")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--out-md", required=True)
    s.add_argument("--sizes", type=float, nargs="+", default=[4.5, 3.0, 2.0],
                   help="bone cell sizes (mm); screw cells are half, peri-screw a third")
    s.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    s.add_argument("--voxel-mm", type=float, default=0.5)
    s.add_argument("--triad-n", type=int, default=20_000_000,
                   help="triad array length per rank (doubles)")
    s.add_argument("--nonlinear-results", default="results/demo",
                   help="cohort results folder whose nonlinear solve JSONs are summarised")

    s = sub.add_parser("peer", help="side by side with ParOSol (parosol-py, its own venv: "
                       "make peer-env): stiffness and wall time of a vertebral-body specimen "
                       "with PMMA caps at several voxel / cell sizes (markdown + JSON)")
    s.add_argument("--scan", required=True, help="results/<cohort>/<patient>/<timepoint>")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--out-md", required=True,
                   help="markdown file whose peer section is replaced (or appended)")
    s.add_argument("--voxel-sizes", type=float, nargs="+", default=[1.5, 1.0, 0.75, 0.5],
                   help="ParOSol voxel sizes (mm), divisors of 3 mm; include the CT's own")
    s.add_argument("--cell-sizes", type=float, nargs="+", default=[4.5, 3.0, 2.0, 1.5],
                   help="our bone cell sizes (mm)")
    s.add_argument("--ranks", type=int, default=2, help="MPI processes for each tool")
    s.add_argument("--cap-mm", type=float, default=3.0,
                   help="PMMA cap thickness beyond the highest / lowest bone (mm)")
    s.add_argument("--materials", default="",
                   help="materials section as JSON (law, poisson, cap modulus); default the "
                        "pipeline's defaults")
    s.add_argument("--control-density", type=float, default=None,
                   help="also run the specimen with this one density (mg/cm³) everywhere: a "
                        "control that separates geometry and end conditions from the E field")
    s.add_argument("--control-voxel-sizes", type=float, nargs="+", default=None,
                   help="ParOSol voxel sizes of the control (default --voxel-sizes)")
    s.add_argument("--control-cell-sizes", type=float, nargs="+", default=None,
                   help="our bone cell sizes of the control (default --cell-sizes)")
    s.add_argument("--peer-python", default=None,
                   help="Python of the environment holding parosol-py (default "
                        ".peer-venv/bin/python)")

    s = sub.add_parser("throughput", help="cohort wall time and solve time against mesh size "
                       "from earlier workflow runs' benchmark files (picture + markdown)")
    s.add_argument("--cohort", action="append", required=True,
                   help="cohort name (benchmarks/<name>, results/<name>); repeatable")
    s.add_argument("--benchmarks", default="benchmarks")
    s.add_argument("--results", default="results")
    s.add_argument("--perf-json", default=None,
                   help="perf.json of `qctfea-bench perf`: adds the per-stage cost against DOFs")
    s.add_argument("--out-png", required=True)
    s.add_argument("--out-md", required=True,
                   help="markdown file whose throughput section is replaced (or appended)")
    s.add_argument("--out-json", default=None, help="per-cohort numbers and per-solve rows")

    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    handler = logs.log_to(sys.stderr, ("qctfea", "qctfea_bench"))
    try:
        if a.cmd == "benchmarks":
            from qctfea_bench import benchmarks

            print(benchmarks.write_summary(a.root, a.out_md, a.out_json).to_string(index=False))
        elif a.cmd == "mesh-convergence":
            from qctfea_bench import convergence

            convergence.main_cli(a)
        elif a.cmd == "perf":
            from qctfea_bench import perf

            perf.main_cli(a)
        elif a.cmd == "throughput":
            from qctfea_bench import throughput

            throughput.main_cli(a)
        elif a.cmd == "peer":
            from qctfea_bench import peer

            peer.main_cli(a)
    except QctfeaError as exc:
        print(f"qctfea-bench {a.cmd}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        logs.remove(handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
