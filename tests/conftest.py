"""Shared fixtures: one small synthetic scan processed once per session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The SLURM test cluster's session fixtures (started early, run in the background)
from slurm_cluster import (_start_slurm_early, local_background, slurm_background,  # noqa: F401
                           slurm_study_data)


def pytest_collection_modifyitems(session, config, items):
    """The SLURM tests last: the two workflow runs they compare (tests/slurm_cluster.py) run
    in the background from the session's start, on the CPU time the other tests leave idle."""
    items.sort(key=lambda item: item.path.name == "test_slurm.py")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "real"


@pytest.fixture
def real_scans() -> Path:
    """../shared/data/real with both real scans, or the test fails: CI has ../shared, so a
    test that needs it must fail there when it is missing, not skip."""
    for name in ("verse_tptbox_L3", "totalseg_L1"):
        if not (SHARED / name).is_dir():
            pytest.fail(f"{SHARED / name} is missing: the real scans of ../shared/data/real "
                        "are needed (see its README)")
    return SHARED


@pytest.fixture(scope="session")
def real_l1_ingested(tmp_path_factory) -> dict:
    """The real TotalSegmentator L1 of ../shared/data/real ingested once per session:
    {"src": its folder, "root": a folder holding the ingested ct.nii.gz}."""
    from qctfea.steps import imaging as steps_imaging

    src = SHARED / "totalseg_L1"
    assert src.is_dir(), f"{src} is missing: the real scans of ../shared/data/real are needed"
    root = tmp_path_factory.mktemp("l1_ingested")
    steps_imaging.ingest(source=src / "ct.nii.gz", out_image=root / "ct.nii.gz",
                         out_json=root / "scan.json", context="T01 M00")
    return {"src": src, "root": root}


def markdown_rows(text: str) -> list[tuple[str, ...]]:
    """The cells (stripped) of every row of the markdown pipe tables in ``text``: header
    rows included, alignment rows left out; independent of the column padding."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            cells = tuple(c.strip() for c in line[1:-1].split("|"))
            if not all(set(c) <= set(":-") and c for c in cells):
                rows.append(cells)
    return rows


def check_stiffness_bounds(results: dict) -> None:
    """The load-case results ``results`` ({"compression": its JSON, "pullout_left": ...})
    checked by their solves against their models' stiffness bounds (qctfea.fea.bounds;
    docs/science.md#stiffness-bounds): the bounds held the solves' own endplate and
    screw-head nodes, and each stiffness lies within them (compression between the lower
    and the upper bound, pullout below its upper bound)."""
    for case, res in results.items():
        b, k = res["stiffness_bounds"], res["stiffness_n_per_mm"]
        print(f"{case} stiffness {k:.0f} N/mm, bounds {b['lower_n_per_mm']:.0f}-"
              f"{b['upper_n_per_mm']:.0f}")
        assert b["nodes_match"] and b["within"], (case, k, b)
        assert b["lower_n_per_mm"] <= k * (1 + 1e-3) and k <= b["upper_n_per_mm"] * (1 + 1e-3)
        assert (b["lower_n_per_mm"] > 0) == ("compression" in case), (case, b)


def venv_bin(name: str) -> str:
    """An executable of the running interpreter's environment (mpiexec, snakemake, qctfea)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def imaging_steps(src: Path, r: Path, ctx: str) -> None:
    """ingest -> calibrate -> mask of a synthetic scan folder ``src`` into ``r``."""
    from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra

    steps_imaging.ingest(source=src / "dicom", out_image=r / "ct.nii.gz", out_json=r / "scan.json",
                         context=ctx)
    steps_imaging.calibrate(ct_path=r / "ct.nii.gz", labels_path=src / "labels.nii.gz",
                            out_density=r / "density.nii.gz", out_json=r / "calibration.json",
                            out_png=r / "calibration.png",
                            cfg={"phantom": {"preset": "demo_k2hpo4"}}, context=ctx, label=23)
    steps_vertebra.mask(ct_path=r / "ct.nii.gz", labels_path=src / "labels.nii.gz",
                        out_parts=r / "vertebra.nii.gz", out_json=r / "vertebra.json", cfg={},
                        context=ctx)


@pytest.fixture(scope="session")
def demo_scan(tmp_path_factory):
    """Synthetic scan P01/M12 run through ingest -> calibrate -> mask -> screws -> bmd."""

    from qctfea.steps import imaging as steps_imaging, model as steps_model

    root = tmp_path_factory.mktemp("scan")
    src = root / "P01" / "M12"
    truth = __import__("qctfea.demo.synth", fromlist=["generate_scan"]).generate_scan(
        src, "P01", "M12", 12.0, seed=7)
    r = root / "results"
    ctx = "patient P01, timepoint M12"
    imaging_steps(src, r, ctx)
    steps_model.plan_screws(landmarks_path=src / "landmarks.json", parts_path=r / "vertebra.nii.gz",
                            out_json=r / "screws.json", cfg={}, context=ctx)
    steps_imaging.bmd(density_path=r / "density.nii.gz", parts_path=r / "vertebra.nii.gz",
                      screws_path=r / "screws.json", out_json=r / "bmd.json", cfg={}, context=ctx)
    return {"src": src, "results": r, "truth": truth, "context": ctx}


@pytest.fixture(scope="session")
def demo_model(demo_scan):
    """Coarse mesh + materials of the demo scan."""

    from qctfea.steps import model as steps_model

    r = demo_scan["results"]
    ctx = demo_scan["context"]
    steps_model.mesh(parts_path=r / "vertebra.nii.gz", screws_path=r / "screws.json",
                     out_mesh=r / "mesh.xdmf", out_json=r / "mesh.json",
                     cfg={"voxel_mm": 0.6, "bone_cell_size_mm": 3.5, "screw_cell_size_mm": 2.0,
                          "peri_screw_cell_size_mm": 2.0}, context=ctx)
    steps_model.materials(mesh_path=r / "mesh.xdmf", density_path=r / "density.nii.gz",
                          screws_path=r / "screws.json", out_npz=r / "materials.npz",
                          out_json=r / "materials.json", cfg={}, context=ctx)
    return demo_scan


def run(cmd, env_on_path: bool = True, **kw):
    """Run a command; with ``env_on_path`` the environment's bin (mpiexec, qctfea,
    snakemake) first on PATH, as `make` does, else left out of PATH (a user who starts
    `.venv/bin/snakemake` without activating the environment)."""
    env_bin = str(Path(sys.executable).parent)
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != env_bin]
    path = os.pathsep.join(([env_bin] if env_on_path else []) + rest)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
