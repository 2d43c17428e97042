"""Bounds on a compression model's stiffness from two admissible fields (docs/science.md,
"Stiffness bounds").

The compression load case (:mod:`qctfea.fea.loadcases`) holds the nodes of the inferior
endplate facets and moves those of the superior ones by ``delta`` along the body's superior
axis ``a``. Two textbook fields of the same model (mesh, tags, per-cell Young's modulus and
Poisson's ratio) bound its stiffness K = reaction / delta without solving it:

- **Upper bound, kinematic (axial displacement only).** Any displacement field that takes
  the prescribed values stores at least the energy of the solution: K <= 2 U(u) / delta^2.
  The fields used move every point along ``a`` only, ``u = -delta phi a`` (no lateral
  motion, hence no Poisson expansion: a homogeneous prism between bonded platens gives the
  constrained modulus M = lambda + 2 mu in place of E); phi is 0 on the held nodes, 1 on the
  moved ones, and its other nodal values are those that minimise the energy on the model's
  linear tetrahedra (a scalar problem, solved here with scipy). The energy is that of the
  finite element interpolant, so the bound holds for the finite element model itself (its
  discrete solution minimises the same energy over a space that holds this field).
- **Lower bound, static (columns in parallel).** Any stress field in equilibrium, free of
  traction on the free surface, gives K >= F^2 / (2 U*(sigma)) (minimum complementary
  energy). The field used is uniaxial stress along ``a`` in the straight columns that run
  from an inferior endplate facet to a superior one wholly inside the model; with the best
  split of the force between columns, K >= sum over columns of dA / (integral of ds / E).
  The exact continuum stiffness is at least this, and the finite element stiffness is at
  least the continuum one. Columns are sampled on a square grid of rays (``ray_mm``); a grid
  square counts when its four corner rays are columns, with the largest of their
  compliances, so that sampling does not raise the bound by counting squares that reach
  past the endplate.

Written here because no library computes either: both are a few lines of linear algebra on
the model's arrays (:mod:`qctfea.model.mesh_arrays`); they need neither DOLFINx nor a solve.
"""
from __future__ import annotations

import numpy as np

from qctfea.model.mesh_arrays import boundary_triangles
from qctfea.model.tags import TAG_BODY, TAG_CAP, TAG_SCREW


def endplates(points, cells, tags, axis, centroid, *, zone_fraction: float,
              angle_deg: float) -> dict:
    """The compression load case's endplate facets and node sets, as
    :func:`qctfea.fea.loadcases.compression_dofs` selects them: exterior facets of body
    cells (of cap cells when the model has caps) whose outward normal is within
    ``angle_deg`` of +axis (-axis) and whose midpoint lies in the top (bottom)
    ``zone_fraction`` of the facets' extent along the axis; nodes of screw cells left out."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    loaded_tag = TAG_CAP if (np.asarray(tags) == TAG_CAP).any() else TAG_BODY
    tri, owner = boundary_triangles(points, cells, with_owners=True)
    sel = np.asarray(tags)[owner] == loaded_tag
    tri = tri[sel]
    p0, p1, p2 = (points[tri[:, k]] for k in range(3))
    normal = np.cross(p1 - p0, p2 - p0)
    cosang = normal @ a / np.linalg.norm(normal, axis=1)
    h = ((p0 + p1 + p2) / 3.0 - np.asarray(centroid, float)) @ a
    zone = zone_fraction * (h.max() - h.min())
    cmin = np.cos(np.radians(angle_deg))
    sup = tri[(h >= h.max() - zone) & (cosang >= cmin)]
    inf = tri[(h <= h.min() + zone) & (cosang <= -cmin)]
    screw_nodes = np.unique(cells[np.isin(tags, list(TAG_SCREW.values()))])
    return {"superior_facets": sup, "inferior_facets": inf,
            "superior_nodes": np.setdiff1d(np.unique(sup), screw_nodes),
            "inferior_nodes": np.setdiff1d(np.unique(inf), screw_nodes),
            "screw_nodes": screw_nodes}


def _lame(youngs, poisson):
    lam = youngs * poisson / ((1.0 + poisson) * (1.0 - 2.0 * poisson))
    return lam, youngs / (2.0 * (1.0 + poisson))


def _gradients(points, cells):
    """Gradients of the four barycentric coordinates of every tetrahedron, (n, 4, 3), and
    the volumes."""
    x = points[cells]
    jac = np.transpose(x[:, 1:] - x[:, :1], (0, 2, 1))  # columns: edges from vertex 0
    inv = np.linalg.inv(jac)  # rows: gradients of barycentric coordinates 1..3
    grads = np.concatenate([-inv.sum(axis=1, keepdims=True), inv], axis=1)
    return grads, np.abs(np.linalg.det(jac)) / 6.0


def upper_bound(points, cells, youngs, poisson, axis, held_nodes, moved_nodes) -> float:
    """Stiffness (force per displacement) of the best axial field ``u = -delta phi a``: the
    nodal values phi (0 on the held nodes, 1 on the moved ones) that minimise the energy of
    the linear tetrahedra's interpolant, a scalar problem with conductivity
    D = mu I + (lambda + mu) a a^T (its energy density is grad(phi)^T D grad(phi) / 2 per
    unit delta^2), solved with scipy."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    if np.intersect1d(held_nodes, moved_nodes).size:
        raise ValueError("upper bound: a node is both held and moved")
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    lam, mu = _lame(np.asarray(youngs, float), np.asarray(poisson, float))
    grads, vol = _gradients(points, cells)
    ga = grads @ a  # (n, 4)
    local = vol[:, None, None] * (mu[:, None, None] * np.einsum("cik,cjk->cij", grads, grads)
                                  + (lam + mu)[:, None, None] * ga[:, :, None] * ga[:, None, :])
    n = len(points)
    rows = np.repeat(cells, 4, axis=1).reshape(-1)
    cols = np.tile(cells, (1, 4)).reshape(-1)
    K = coo_matrix((local.reshape(-1), (rows, cols)), shape=(n, n)).tocsr()
    phi = np.zeros(n)
    phi[moved_nodes] = 1.0
    fixed = np.zeros(n, bool)
    fixed[held_nodes] = fixed[moved_nodes] = True
    used = np.zeros(n, bool)
    used[cells] = True
    free = np.flatnonzero(used & ~fixed)
    phi[free] = spsolve(K[free][:, free].tocsc(), -(K[free] @ phi))
    return float(phi @ (K @ phi))


def _facet_keys(tri: np.ndarray) -> set:
    return {tuple(t) for t in np.sort(tri, axis=1).tolist()}


def _lateral_basis(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e1 = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(a, e1)


def _ray_pieces(points, cells, grads, gu, gv, start, a, chunk: int = 500_000):
    """The pieces of the rays ``gu[i] e1 + gv[j] e2 + (start + t) a`` (ray index
    ``i * len(gv) + j``) inside each tetrahedron: rows (ray, tet, t_in, t_out, entry face,
    exit face), a face named by the vertex it lacks."""
    e1, e2 = _lateral_basis(a)
    lat = np.stack([points @ e1, points @ e2], axis=1)[cells]  # (n, 4, 2)
    lo, hi = lat.min(axis=1), lat.max(axis=1)
    i0, i1 = np.searchsorted(gu, lo[:, 0]), np.searchsorted(gu, hi[:, 0], side="right")
    j0, j1 = np.searchsorted(gv, lo[:, 1]), np.searchsorted(gv, hi[:, 1], side="right")
    nj = np.maximum(j1 - j0, 0)
    n = np.maximum(i1 - i0, 0) * nj
    c = np.repeat(np.arange(len(cells)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    i = np.repeat(i0, n) + k // np.repeat(np.maximum(nj, 1), n)
    j = np.repeat(j0, n) + k % np.repeat(np.maximum(nj, 1), n)
    ray = i * len(gv) + j
    origin = gu[i, None] * e1 + gv[j, None] * e2 + start * a
    x0 = points[cells[:, 0]]
    out = []
    for s in range(0, len(c), chunk):
        cc, rr, oo = c[s:s + chunk], ray[s:s + chunk], origin[s:s + chunk]
        alpha = np.einsum("ckj,cj->ck", grads[cc], oo - x0[cc])
        alpha[:, 0] += 1.0  # barycentric coordinate 0 is 1 minus the others
        beta = grads[cc] @ a
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -alpha / beta
        t_in = np.where(beta > 0, t, -np.inf)
        t_out = np.where(beta < 0, t, np.inf)
        blocked = ((beta == 0) & (alpha < 0)).any(axis=1)
        tin, tout = t_in.max(axis=1), t_out.min(axis=1)
        keep = ~blocked & (tout > tin + 1e-9)
        out.append(np.stack([rr[keep], cc[keep], tin[keep], tout[keep],
                             t_in[keep].argmax(axis=1), t_out[keep].argmin(axis=1)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 6))


def _face(cells, cell: float, lacks: float) -> tuple:
    return tuple(sorted(np.delete(cells[int(cell)], int(lacks)).tolist()))


def _column_compliance(p, cells, youngs, inf_keys, sup_keys, eps: float = 1e-6) -> float:
    """integral of ds / E along one ray's run of the model that enters through inferior
    endplate facets and leaves through superior ones (inf when there is none). ``p``: the
    ray's pieces (:func:`_ray_pieces`). A ray that runs along a face shared by two cells
    lies in both: it takes the softer one's modulus."""
    ts = np.unique(np.concatenate([p[:, 2], p[:, 3]]))
    mids = 0.5 * (ts[:-1] + ts[1:])
    cover = (p[:, 2:3] - eps <= mids) & (mids <= p[:, 3:4] + eps)  # rounding: no gaps
    density = np.where(cover, 1.0 / youngs[p[:, 1].astype(int)][:, None], 0.0).max(axis=0)
    inside = cover.any(axis=0)
    gaps = np.flatnonzero(~inside)
    for lo, hi in zip(np.concatenate([[-1], gaps]), np.concatenate([gaps, [len(mids)]])):
        if hi - lo < 2:
            continue
        t0, t1 = ts[lo + 1], ts[hi]  # the run [t0, t1]
        first, last = np.abs(p[:, 2] - t0) < eps, np.abs(p[:, 3] - t1) < eps
        if (all(_face(cells, c, f) in inf_keys for c, f in p[first][:, [1, 4]])
                and all(_face(cells, c, f) in sup_keys for c, f in p[last][:, [1, 5]])):
            seg = slice(lo + 1, hi)
            return float(np.sum(np.diff(ts)[seg] * density[seg]))
    return np.inf


def lower_bound(points, cells, youngs, axis, inferior_facets, superior_facets, screw_nodes,
                ray_mm: float = 0.5) -> dict:
    """Stiffness of uniaxial stress in the columns from an inferior to a superior endplate
    facet (module docstring); facets with a screw node are not endplate (not held there)."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    youngs = np.asarray(youngs, float)
    grads, _ = _gradients(points, cells)
    screw = np.zeros(len(points), bool)
    screw[screw_nodes] = True
    inf_keys = _facet_keys(inferior_facets[~screw[inferior_facets].any(axis=1)])
    sup_keys = _facet_keys(superior_facets[~screw[superior_facets].any(axis=1)])
    e1, e2 = _lateral_basis(a)
    foot = points[np.unique(inferior_facets)]
    u, v = foot @ e1, foot @ e2
    gu = np.arange(u.min() + ray_mm / 2, u.max(), ray_mm)
    gv = np.arange(v.min() + ray_mm / 2, v.max(), ray_mm)
    pieces = _ray_pieces(points, cells, grads, gu, gv, (points @ a).min() - 1.0, a)
    compliance = np.full(len(gu) * len(gv), np.inf)
    if len(pieces):
        pieces = pieces[np.lexsort((pieces[:, 2], pieces[:, 0]))]
        for p in np.split(pieces, np.flatnonzero(np.diff(pieces[:, 0])) + 1):
            compliance[int(p[0, 0])] = _column_compliance(p, cells, youngs, inf_keys,
                                                          sup_keys)
    grid = compliance.reshape(len(gu), len(gv))
    corners = np.maximum(np.maximum(grid[:-1, :-1], grid[1:, :-1]),
                         np.maximum(grid[:-1, 1:], grid[1:, 1:]))
    counted = np.isfinite(corners)
    return {"stiffness_n_per_mm": float(np.sum(ray_mm ** 2 / corners[counted])),
            "column_area_mm2": float(counted.sum() * ray_mm ** 2)}


def compression_bounds(points, cells, tags, youngs, poisson, axis, centroid, *,
                       zone_fraction: float, angle_deg: float, ray_mm: float = 0.5,
                       load_axis=None) -> dict:
    """Lower and upper bound on the compression stiffness of a model (N/mm with moduli in
    MPa and lengths in mm), with the endplate node counts for comparison with the solve.
    ``axis``: the body's superior axis (selects the endplates); ``load_axis``: the
    direction the platens move in (default ``axis``; free platens: the scan axis nearest
    it, pointing the same way)."""
    ends = endplates(points, cells, tags, axis, centroid, zone_fraction=zone_fraction,
                     angle_deg=angle_deg)
    load = axis if load_axis is None else load_axis
    lower = lower_bound(points, cells, youngs, load, ends["inferior_facets"],
                        ends["superior_facets"], ends["screw_nodes"], ray_mm=ray_mm)
    upper = upper_bound(points, cells, youngs, poisson, load, ends["inferior_nodes"],
                        ends["superior_nodes"])
    return {"lower_n_per_mm": lower["stiffness_n_per_mm"], "upper_n_per_mm": upper,
            "column_area_mm2": lower["column_area_mm2"],
            "superior_nodes": int(len(ends["superior_nodes"])),
            "inferior_nodes": int(len(ends["inferior_nodes"]))}


def pullout_upper_bound(points, cells, tags, youngs, poisson, axis, centroid, screw: dict, *,
                        zone_fraction: float, angle_deg: float, head_face_mm: float) -> dict:
    """Upper bound on a screw's pullout stiffness (N/mm): the best field along the pull
    direction (:func:`upper_bound`) with the pullout load case's conditions
    (:func:`qctfea.fea.loadcases.pullout_dofs`): both endplates held (nodes of screw cells
    left out), the screw head's end face (exterior facets of the screw's cells within
    ``head_face_mm`` of its outermost one along the axis) moved. ``screw``: an entry of
    screws.json (``side``, ``entry_mm``, ``axis``)."""
    ends = endplates(points, cells, tags, axis, centroid, zone_fraction=zone_fraction,
                     angle_deg=angle_deg)
    tri, owner = boundary_triangles(points, cells, with_owners=True)
    tri = tri[np.asarray(tags)[owner] == TAG_SCREW[screw["side"]]]
    b = np.asarray(screw["axis"], float) / np.linalg.norm(screw["axis"])
    depth = (points[tri].mean(axis=1) - np.asarray(screw["entry_mm"], float)) @ b
    head = np.unique(tri[depth <= depth.min() + head_face_mm])
    held = np.union1d(ends["superior_nodes"], ends["inferior_nodes"])
    return {"upper_n_per_mm": upper_bound(points, cells, youngs, poisson, -b, held, head),
            "head_nodes": int(len(head))}



def check_solve(case: str, result: dict, *, mesh_path, materials: dict, axis_info: dict,
                zone_fraction: float, angle_deg: float, head_face_mm: float,
                screw: dict | None = None, rtol: float = 1e-3, ray_mm: float = 1.0) -> dict:
    """The bounds of a solved load case's model and whether its stiffness lies within them
    (``within``; ``rtol`` for the solve's tolerance): compression between the lower and the
    upper bound along the load direction the solve recorded (the body axis, or the scan
    axis of free platens), pullout below its upper bound. A stiffness outside them means a
    wrong solve, not a property of the bone. The bounds hold the nodes the solve held
    (``nodes_match``: the same numbers of endplate or screw-head nodes as the solve's);
    when they do not, ``within`` is None: the bounds are of another problem. Columns every
    ``ray_mm`` (1 mm: half the time of 0.5 mm on a vertebra, about 1 s, for a lower bound
    15-30 % lower)."""
    from qctfea.model.mesh_arrays import read_model

    points, cells, tags = read_model(mesh_path)
    body = np.asarray(axis_info["superior_axis"], float)
    args = (points, cells, tags, materials["youngs_mpa"], materials["poisson"], body,
            axis_info["centroid_mm"])
    where = {"zone_fraction": zone_fraction, "angle_deg": angle_deg}
    if case == "compression":
        load = -np.asarray(result["load_direction"], float)
        b = compression_bounds(*args, **where, load_axis=load * np.sign(load @ body),
                               ray_mm=ray_mm)
        out = {"lower_n_per_mm": b["lower_n_per_mm"], "upper_n_per_mm": b["upper_n_per_mm"]}
        nodes = {k: b[k] for k in ("superior_nodes", "inferior_nodes")}
    else:
        b = pullout_upper_bound(*args, screw, **where, head_face_mm=head_face_mm)
        out = {"lower_n_per_mm": 0.0, "upper_n_per_mm": b["upper_n_per_mm"]}
        nodes = {"head_nodes": b["head_nodes"]}
    out["nodes_match"] = all(result.get(k) == v for k, v in nodes.items())
    k = result["stiffness_n_per_mm"]
    out["within"] = (bool(out["lower_n_per_mm"] * (1 - rtol) <= k
                          <= out["upper_n_per_mm"] * (1 + rtol))
                     if out["nodes_match"] else None)
    return out
