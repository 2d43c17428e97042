"""Mechanics verification: closed forms, and 1 vs 2 MPI ranks on a vertebra model."""
import json
import os
import subprocess
import sys

import dolfinx_solver  # noqa: F401  (before dolfinx or petsc4py)
import numpy as np
import pytest

import pixels
from conftest import REPO, check_stiffness_bounds, run, venv_bin


def _box_model(E, nu, L=10.0, W=4.0, n=(4, 4, 10)):
    import dolfinx
    from mpi4py import MPI

    from qctfea.fea.elasticity import ElasticModel

    mesh = dolfinx.mesh.create_box(MPI.COMM_WORLD, [[0, 0, 0], [W, W, L]], list(n),
                                   dolfinx.mesh.CellType.tetrahedron)
    ncell = mesh.topology.index_map(3).size_global
    return ElasticModel(mesh, np.full(ncell, E), np.full(ncell, nu)), mesh


def _top_bottom_dofs(model, mesh, L):
    import dolfinx

    top = dolfinx.mesh.locate_entities_boundary(mesh, 2, lambda x: np.isclose(x[2], L))
    bot = dolfinx.mesh.locate_entities_boundary(mesh, 2, lambda x: np.isclose(x[2], 0.0))
    return (dolfinx.fem.locate_dofs_topological(model.V, 2, top),
            dolfinx.fem.locate_dofs_topological(model.V, 2, bot))


def test_prism_uniaxial_stiffness_closed_form():
    """Clamped ends with nu = 0 give exactly uniaxial strain: k = E A / L."""
    import dolfinx

    E, L, W, d = 1500.0, 10.0, 4.0, 0.05
    model, mesh = _box_model(E, 0.0, L, W)
    top, bot = _top_bottom_dofs(model, mesh, L)
    bcs = [dolfinx.fem.dirichletbc(np.zeros(3), bot, model.V),
           dolfinx.fem.dirichletbc(np.array([0, 0, -d]), top, model.V)]
    info = model.solve(bcs)
    force = model.reaction(top, np.array([0, 0, -1.0]))
    assert force / d == pytest.approx(E * W * W / L, rel=5e-3)
    assert info.iterations < 100


def test_two_materials_in_series_closed_form():
    """Bottom half E1, top half E2 (nu = 0): 1/k = L1/(E1 A) + L2/(E2 A)."""
    import dolfinx
    from mpi4py import MPI

    from qctfea.fea.elasticity import ElasticModel

    L, W, d, E1, E2 = 10.0, 4.0, 0.05, 500.0, 110000.0
    mesh = dolfinx.mesh.create_box(MPI.COMM_WORLD, [[0, 0, 0], [W, W, L]], [3, 3, 10],
                                   dolfinx.mesh.CellType.tetrahedron)
    # E by original cell index, from the cell midpoints computed in the original order.
    n_local = mesh.topology.index_map(3).size_local
    mid = dolfinx.mesh.compute_midpoints(mesh, 3, np.arange(n_local, dtype=np.int32))
    orig = np.asarray(mesh.topology.original_cell_index)[:n_local]
    ncell = mesh.topology.index_map(3).size_global
    E_orig = np.zeros(ncell)
    E_orig[orig] = np.where(mid[:, 2] < L / 2, E1, E2)
    E_orig = mesh.comm.allreduce(E_orig, op=MPI.SUM)
    model = ElasticModel(mesh, E_orig, np.zeros(ncell))
    top, bot = _top_bottom_dofs(model, mesh, L)
    bcs = [dolfinx.fem.dirichletbc(np.zeros(3), bot, model.V),
           dolfinx.fem.dirichletbc(np.array([0, 0, -d]), top, model.V)]
    model.solve(bcs)
    force = model.reaction(top, np.array([0, 0, -1.0]))
    A = W * W
    k = 1.0 / (L / 2 / (E1 * A) + L / 2 / (E2 * A))
    assert force / d == pytest.approx(k, rel=5e-3)


def test_nonconvergence_raises_with_reason():
    import dolfinx

    from qctfea.errors import QctfeaError

    model, mesh = _box_model(1000.0, 0.3)
    top, bot = _top_bottom_dofs(model, mesh, 10.0)
    bcs = [dolfinx.fem.dirichletbc(np.zeros(3), bot, model.V),
           dolfinx.fem.dirichletbc(np.array([0, 0, -0.1]), top, model.V)]
    with pytest.raises(QctfeaError, match="DIVERGED_MAX_IT"):
        model.solve(bcs, {"ksp_max_it": 2, "pc_type": "jacobi"})


def test_a_breakdown_is_solved_again_with_the_fallback_multigrid():
    """A smoother that amplifies the error (Richardson at 10x the step) makes CG break down;
    the solve tries again with FALLBACK_PETSC_OPTIONS, records how the first attempt failed,
    and gives the reaction of the default solve."""
    import dolfinx

    model, mesh = _box_model(1000.0, 0.3)
    top, bot = _top_bottom_dofs(model, mesh, 10.0)
    bcs = [dolfinx.fem.dirichletbc(np.zeros(3), bot, model.V),
           dolfinx.fem.dirichletbc(np.array([0, 0, -0.1]), top, model.V)]
    ok = model.solve(bcs)
    assert ok.fallback == ""
    force = model.reaction(top, np.array([0, 0, -1.0]))
    info = model.solve(bcs, {"mg_levels_ksp_type": "richardson",
                             "mg_levels_ksp_richardson_scale": 10.0})
    assert info.fallback.startswith("DIVERGED"), info.fallback
    assert info.converged_reason.startswith("CONVERGED")
    assert model.reaction(top, np.array([0, 0, -1.0])) == pytest.approx(force, rel=1e-8)


def test_singular_blocks_are_found_as_numpy_finds_them():
    """The check that keeps point-block Jacobi off a multigrid level with a singular diagonal
    block: the smallest ratio of smallest to largest eigenvalue over a matrix's 6 x 6 diagonal
    blocks, against numpy's eigenvalues of the same blocks; a rank-3 block (an aggregate of
    one node, whose rotations have no stiffness) is below the threshold, SPD blocks are not."""
    from petsc4py import PETSc

    from qctfea.fea.elasticity import SINGULAR_BLOCK_RATIO, smallest_block_ratio

    rng = np.random.default_rng(3)
    g = rng.normal(size=(6, 6))
    spd = g @ g.T + 0.5 * np.eye(6)
    h = rng.normal(size=(6, 3))
    singular = h @ h.T  # rank 3
    dense = np.zeros((18, 18))
    dense[:6, :6], dense[6:12, 6:12], dense[12:, 12:] = spd, 3.0 * spd, singular
    dense[:6, 6:12] = 0.1 * rng.normal(size=(6, 6))  # coupling between blocks: not used
    dense[6:12, :6] = dense[:6, 6:12].T

    def ratio(blocks):
        w = [np.linalg.eigvalsh(b) for b in blocks]
        return min(v[0] / v[-1] for v in w)

    for blocks, expect_singular in (((0, 1), False), ((0, 1, 2), True)):
        n = 6 * len(blocks)
        A = PETSc.Mat().createAIJ([n, n], bsize=6, comm=PETSc.COMM_SELF)
        A.setUp()
        A.setValues(range(n), range(n), dense[:n, :n].ravel())
        A.assemble()
        got = smallest_block_ratio(A)
        assert got == pytest.approx(ratio([dense[6 * k:6 * k + 6, 6 * k:6 * k + 6]
                                           for k in blocks]), rel=1e-9, abs=1e-14)
        assert (got < SINGULAR_BLOCK_RATIO) == expect_singular, got
        A.destroy()


def test_weighted_quantile():
    from qctfea.fea.loadcases import weighted_quantile

    v = np.array([5.0, 1.0, 3.0, 2.0])
    w = np.array([1.0, 1.0, 1.0, 1.0])
    assert weighted_quantile(v, w, 0.5) == 2.0
    assert weighted_quantile(v, w, 0.76) == 5.0
    assert weighted_quantile(v, np.array([0.0, 0.0, 0.0, 1.0]), 0.5) == 2.0


@pytest.mark.slow
def test_vertebra_solves_agree_on_1_and_2_ranks(demo_model, tmp_path):
    """Compression and pullout, linear and nonlinear, on the demo vertebra with 1 and 2
    MPI ranks: stiffness and strength agree to 1e-6 relative (the nonlinear runs in
    equilibrium to 1e-6, not the default 1e-4, so that the two partitions' iterates can be
    compared that closely)."""
    from concurrent.futures import ThreadPoolExecutor

    r = demo_model["results"]
    cmds = {}
    for analysis in ("nonlinear", "linear"):
        for n in (1, 2):
            for case, side in (("compression", None), ("pullout", "left")):
                o = tmp_path / f"{analysis}_{case}_{n}.json"
                cmd = [venv_bin("mpiexec"), "-n", str(n), sys.executable, "-m", "qctfea.cli",
                       "solve", case, "--mesh", str(r / "mesh.xdmf"),
                       "--materials", str(r / "materials.npz"), "--vertebra",
                       str(r / "vertebra.json"), "--screws", str(r / "screws.json"),
                       "--out-json", str(o), "--params",
                       json.dumps({"analysis": analysis, "newton_rtol": 1e-6})]
                if side:
                    cmd += ["--side", side]
                if (analysis, n) == ("nonlinear", 2):
                    cmd += ["--out-curve", str(tmp_path / f"{case}.csv"),
                            "--out-plot", str(tmp_path / f"{case}.png"),
                            "--out-fields", str(tmp_path / f"{case}_fields.xdmf")]
                cmds[analysis, case, n] = (cmd, o)
    # The 1-rank solves two at a time (one per core), the 2-rank solves one at a time.
    one = [k for k in cmds if k[2] == 1]
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(one, pool.map(lambda k: run(cmds[k][0], cwd=REPO, timeout=300), one)))
    procs.update({k: run(cmds[k][0], cwd=REPO, timeout=300) for k in cmds if k[2] == 2})
    out = {}
    for k, p in procs.items():
        assert p.returncode == 0, (k, p.stderr[-3000:])
        out[k] = json.loads(cmds[k][1].read_text())
    for analysis in ("linear", "nonlinear"):
        for case in ("compression", "pullout"):
            a, b = out[analysis, case, 1], out[analysis, case, 2]
            assert b["mpi_ranks"] == 2 and a["analysis"] == analysis
            for key in ("stiffness_n_per_mm", "strength_n"):
                assert b[key] == pytest.approx(a[key], rel=1e-6), (analysis, case, key)
    for case in ("compression", "pullout"):
        lin, nl = out["linear", case, 1], out["nonlinear", case, 1]
        # The nonlinear probe increment is elastic: its slope is the linear stiffness.
        assert nl["stiffness_n_per_mm"] == pytest.approx(lin["stiffness_n_per_mm"], rel=0.02)
        assert nl["increments"] >= 3 and nl["newton_iterations"] >= nl["increments"]
        assert nl["strength_rule"] == "peak" and nl["strength_n"] == nl["peak_force_n"]
        if nl["offset_yield_n"] is not None:
            assert nl["offset_yield_n"] <= nl["peak_force_n"] + 1e-9
        curve = np.loadtxt(tmp_path / f"{case}.csv", delimiter=",", skiprows=1)
        assert curve.shape[0] == nl["increments"] + 1
        # the picture: the strength line (red) at the height of the curve's top (blue)
        rows_blue, _ = _pixels(tmp_path / f"{case}.png", "blue")
        rows_red, _ = _pixels(tmp_path / f"{case}.png", "red")
        assert np.bincount(rows_red).max() > 100  # a line across the axes
        assert abs(rows_blue.min() - np.bincount(rows_red).argmax()) <= 4
        assert (tmp_path / f"{case}_fields.h5").stat().st_size > 1000
        text = (tmp_path / f"{case}_fields.xdmf").read_text()
        for name in ("displacement_mm", "von_mises_mpa", "damage", "failed", "yielded"):
            assert name in text
    # Physically plausible (docs/science.md#plausible-ranges): osteoporotic vertebra and screw.
    c = out["nonlinear", "compression", 1]
    assert 500 < c["strength_n"] < 8000
    # Every solve's stiffness (linear, and the nonlinear probe's) within the bounds its
    # solve checked it against, on the solve's own endplate and head nodes
    # (docs/science.md#stiffness-bounds; the bounds' closed forms: test_bounds)
    check_stiffness_bounds({f"{a} {c} {n}": v for (a, c, n), v in out.items()})
    p = out["nonlinear", "pullout", 1]
    # Osteoporotic cadaver screws 0.37 +/- 0.14 kN, normal 0.97 +/- 0.4 kN, a healthy-bone
    # FE model about 1.8 kN (docs/science.md#plausible-ranges): an osteoporotic model stays
    # below the healthy one.
    assert 150 < p["strength_n"] < 1800


def test_endplates_leave_out_the_nodes_of_screws():
    """A screw running along the body's surface to the top shares nodes with the body's
    top facets; held, they would pin the screw to the platen (the real VerSe L3's right
    screw: pullout rose without end). Box 4 x 4 x 10 mm, 4 x 4 x 10 cells, a 1 x 1 mm
    column of screw cells at a corner up to the top: the top face has 5 x 5 = 25 nodes,
    the body's top facets 24 of them (the corner node touches only screw cells), and 3
    of those 24 are shared with the screw column, so 21 are held."""
    import dolfinx
    from mpi4py import MPI

    from qctfea.fea.loadcases import LoadParams, compression_dofs
    from qctfea.model.tags import TAG_BODY, TAG_SCREW

    model, mesh = _box_model(1000.0, 0.3)
    n_cells = mesh.topology.index_map(3).size_local
    mid = dolfinx.mesh.compute_midpoints(mesh, 3, np.arange(n_cells, dtype=np.int32))
    values = np.where((mid[:, 0] < 1) & (mid[:, 1] < 1), TAG_SCREW["right"], TAG_BODY)
    tags = dolfinx.mesh.meshtags(mesh, 3, np.arange(n_cells, dtype=np.int32),
                                 values.astype(np.int32))
    axis_info = {"superior_axis": [0.0, 0.0, 1.0], "centroid_mm": [2.0, 2.0, 5.0]}
    sup, inf, axis, n_sup, n_inf, height = compression_dofs(model, tags, axis_info,
                                                            LoadParams())
    assert MPI.COMM_WORLD.size == 1
    assert (n_sup, n_inf) == (21, 21)
    x = model.V.tabulate_dof_coordinates()[sup]
    assert np.allclose(x[:, 2], 10.0)
    assert not ((x[:, 0] <= 1 + 1e-9) & (x[:, 1] <= 1 + 1e-9)).any()
    assert height == pytest.approx(10.0)


def _pixels(path, colour):
    """Row and column indices of the PNG's pixels of matplotlib's blue (C0) or red (C3),
    by channel thresholds (antialiased lines are blended with the white background)."""
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mask = ((b > 150) & (r < 100)) if colour == "blue" else ((r > 150) & (g < 120) & (b < 120))
    return np.nonzero(mask)


def test_curve_picture_marks_the_peak(tmp_path):
    """The force-displacement picture, read back as pixels: the strength line (red, C3)
    lies at the height of the plotted curve's highest point (blue, C0), and a run without
    a peak has no strength line."""
    from qctfea.steps.fea import plot_curve

    d = np.linspace(0, 0.1, 21)
    f = 1000 * np.sin(np.pi * d / 0.12)  # peak 1000 N at 0.06 mm, then falling
    curve = [{"displacement_mm": float(x), "force_n": float(y)} for x, y in zip(d, f)]
    plot_curve({"curve": curve, "strength_n": float(f.max()), "analysis": "nonlinear"},
               tmp_path / "c.png", "demo")
    rows_blue, _ = _pixels(tmp_path / "c.png", "blue")
    rows_red, cols_red = _pixels(tmp_path / "c.png", "red")
    # the dashed strength line: the row holding most red pixels (the legend swatch is short)
    line_row = np.bincount(rows_red).argmax()
    assert np.bincount(rows_red).max() > 100
    assert abs(rows_blue.min() - line_row) <= 4  # marker radius + line width
    plot_curve({"curve": curve[:8], "strength_n": None, "analysis": "nonlinear"},
               tmp_path / "n.png", "demo")
    rows_red, _ = _pixels(tmp_path / "n.png", "red")
    # only the red heading at the top, no horizontal strength line through the axes
    assert rows_red.size and rows_red.max() < 40


def test_load_parameters_are_the_solvers_declared_once():
    """``loads`` (LoadParams, the configuration) inherits the nonlinear solver's fields from
    NonlinearParams, declared there once with their documentation: none is declared again,
    every one is documented for the schema and the option table, and the values a cohort
    gives reach the solver's parameters."""
    from dataclasses import fields

    from qctfea.fea.loadcases import LoadParams
    from qctfea.fea.plasticity import NonlinearParams

    solver = {f.name for f in fields(NonlinearParams)}
    assert issubclass(LoadParams, NonlinearParams) and len(solver) >= 15
    assert not solver & set(LoadParams.__annotations__)  # none declared again
    for f in fields(NonlinearParams):
        assert f.metadata.get("doc") or f.metadata.get("row"), f.name
    given = {"failure_strain": 0.015, "increments": 40, "integration": "newton",
             "nonlocal_length_mm": None, "strength_rule": "offset"}
    nl = LoadParams(**given).nonlinear()
    assert type(nl) is NonlinearParams
    assert {k: getattr(nl, k) for k in given} == given


def test_an_error_on_one_rank_ends_every_rank(tmp_path):
    """`qctfea solve` under `mpiexec -n 2`: an exception raised on rank 1 only (its step
    replaced by one that raises there while rank 0 goes on to a collective call) ends both
    ranks with the error and its traceback, instead of leaving rank 0 waiting for ever (it
    did: MPICH's mpiexec and mpi4py do not end the other ranks by themselves)."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(
        "import sys\n"
        "from mpi4py import MPI\n"
        "from qctfea import cli\n"
        "def run(args):\n"
        "    MPI.COMM_WORLD.barrier()\n"
        "    if MPI.COMM_WORLD.rank == 1:\n"
        "        raise IndexError('index 7 is out of bounds, on rank 1 only')\n"
        "    MPI.COMM_WORLD.barrier()\n"
        "cli.run = run\n"
        "sys.exit(cli.main(['solve', 'compression', '--mesh', 'm.xdmf', '--materials', 'm.npz',"
        " '--vertebra', 'v.json', '--out-json', 'o.json']))\n")
    p = run([venv_bin("mpiexec"), "-n", "2", sys.executable, str(script)], cwd=tmp_path,
            timeout=120)
    assert p.returncode != 0
    # the exception's line comes before its traceback (the line a refusal quotes survives
    # an abort that cuts the traceback short)
    line = "IndexError: index 7 is out of bounds, on rank 1 only"
    assert line in p.stderr and p.stderr.index(line) < p.stderr.index("Traceback"), p.stderr
    assert "MPI_Abort" in p.stderr + p.stdout


def test_a_solve_ended_by_sigterm_says_why_and_what_to_do_under_slurm(demo_model, tmp_path):
    """A solve that receives SIGTERM (what SLURM sends at a job's time limit) still ends by
    SIGTERM (so the solve rule's shell sees 143 and records nothing), after one line in its
    log naming the time limit, the job's sacct command and the runtime setting."""
    import signal
    import time

    r = demo_model["results"]
    log = tmp_path / "solve.log"
    cmd = [sys.executable, "-m", "qctfea.cli", "solve", "compression",
           "--mesh", str(r / "mesh.xdmf"), "--materials", str(r / "materials.npz"),
           "--vertebra", str(r / "vertebra.json"), "--screws", str(r / "screws.json"),
           "--out-json", str(tmp_path / "o.json"), "--params",
           json.dumps({"analysis": "nonlinear", "increments": 400})]
    env = {**os.environ, "SLURM_JOB_ID": "4242", "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        t0 = time.monotonic()
        while "[solve]" not in log.read_text() and time.monotonic() - t0 < 120:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    text = log.read_text()
    assert code == -signal.SIGTERM, (code, text[-3000:])
    assert "terminated (SIGTERM) before it wrote its result" in text, text[-3000:]
    assert "`sacct -j 4242 -o State,Elapsed,Timelimit` says TIMEOUT" in text
    assert "set-resources: solve: runtime" in text
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("code, recorded", [(137, True), (139, True), (2, True),
                                            (130, False), (143, False), (15, False)])
def test_a_failed_solve_is_recorded_unless_interrupted(tmp_path, code, recorded):
    """`qctfea solve-failed` (the solve rule runs it after a failed `qctfea solve`): a solve
    that stopped with an error is recorded as the case's refusal, quoting the log's last
    Python exception (not MPI's abort line after it, nor the ~~~^^^ markers of a traceback
    that the abort cut short: the aborting rank prints the exception's line before its
    traceback), naming the signal behind an exit code above 128 and, for 137 (SIGKILL),
    memory; an interrupted one (SIGINT 130, SIGTERM 143, and 15: MPICH's mpiexec for ranks
    ended by SIGTERM) writes nothing and exits with its code."""
    log = tmp_path / "solve_pullout_left.log"
    log.write_text("[solve] patient P01, timepoint M00 pullout left: nonlinear analysis\n"
                   "MemoryError: Unable to allocate 3.1 GiB\n"
                   "Traceback (most recent call last):\n"
                   '  File "elasticity.py", line 3, in assemble\n'
                   "    a = np.empty(n)\n"
                   "        ~~~~~~~~^^^\n"
                   "application called MPI_Abort(MPI_COMM_WORLD, 2) - process 1\n")
    out = {k: tmp_path / f"pullout_left{s}" for k, s in (
        ("json", ".json"), ("curve", "_curve.csv"), ("plot", "_curve.png"),
        ("fields", "_fields.xdmf"))}
    p = run([venv_bin("qctfea"), "solve-failed", "pullout", "--side", "left",
             "--exit-code", str(code), "--log", str(log), "--patient", "P01",
             "--timepoint", "M00", "--params", '{"analysis": "nonlinear"}',
             *[a for k, v in out.items() for a in (f"--out-{k}", str(v))]],
            cwd=tmp_path, timeout=120)
    assert p.returncode == (0 if recorded else code), p.stderr
    if not recorded:
        assert not any(v.exists() for v in out.values())
        return
    rec = json.loads(out["json"].read_text())
    assert rec["strength_n"] is None and rec["analysis"] == "nonlinear"
    assert rec["refused"].startswith(
        f"patient P01, timepoint M00, pullout left ({out['json']}): the solve stopped with "
        f"exit code {code}")
    assert f"last error in {log}: 'MemoryError: Unable to allocate 3.1 GiB'" in rec["refused"]
    assert ("(SIGSEGV)" in rec["refused"]) == (code == 139)
    assert ("run out of memory" in rec["refused"]) == (code == 137)
    assert out["curve"].read_text().strip() == "displacement_mm,force_n"
    assert out["fields"].with_suffix(".h5").exists()
    pixels.assert_curve_without_result(out["plot"], rec["stop_reason"])
