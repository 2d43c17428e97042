"""The conda environments (envs/*.yaml) that `--software-deployment-method conda` builds on a
cluster: they cannot be built here (no conda channel is reachable), so these tests check them
against what can be known independently.

- every rule that runs code names an existing env file, and its post-deploy script exists;
- every third-party package the rule's code imports (found by reading the source: the rule's
  script or command, the library functions it calls and the modules they import, transitively)
  is in the rule's environment;
- every package is pinned, and the pins equal the versions of the pip environment this test
  runs in (requirements.txt, installed by envs/bootstrap.sh), so that a cluster run and a
  local run compute with the same libraries;
- the Python version satisfies pyproject.toml's requires-python.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO

RULES = sorted((REPO / "workflow" / "rules").glob("*.smk"))
ENVS = sorted((REPO / "envs").glob("*.yaml"))
SRC = REPO / "src"

# conda-forge package -> the pip distribution it corresponds to (same name when absent).
CONDA_TO_PIP = {
    "simpleitk": "SimpleITK",
    "matplotlib-base": "matplotlib",
    "snakemake-minimal": "snakemake",
    "pyyaml": "PyYAML",
}
# Build tools and native libraries without a pip distribution of their own.
NOT_PIP = {"python", "pip", "setuptools", "petsc", "mpich"}


def _deps(env: Path) -> dict[str, tuple[str, str]]:
    """conda name -> (version, build) of an env file's dependencies (pip: section excluded)."""
    out = {}
    for d in yaml.safe_load(env.read_text())["dependencies"]:
        assert isinstance(d, str), f"{env.name}: unexpected entry {d!r} (no pip: section)"
        name, _, rest = d.partition("=")
        version, _, build = rest.partition("=")
        out[name.strip()] = (version.strip(), build.strip())
    return out


def _rules() -> list[dict]:
    """name, conda env, script or shell of every rule in workflow/rules/*.smk."""
    rules = []
    for smk in RULES:
        text = smk.read_text()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*rule (\w+):", text, re.M)]
        for i, (pos, name) in enumerate(starts):
            block = text[pos:starts[i + 1][0] if i + 1 < len(starts) else len(text)]
            def get(key, block=block):
                # the directive's string: adjacent literals (one per line) concatenated
                m = re.search(rf"^\s*{key}:\s*\n((?:\s*\"[^\"]*\"\s*\n)+)", block, re.M)
                return "".join(re.findall(r'"([^"]*)"', m.group(1))) if m else None
            rules.append({"name": name, "file": smk, "conda": get("conda"),
                          "script": get("script"), "shell": get("shell")})
    return rules


def _imports(tree: ast.AST) -> dict[str, set[str] | None]:
    """Absolute modules imported anywhere in tree -> the names taken from them (None: the
    whole module, as `import m` or `from pkg import m` give it). Relative imports ignored."""
    out: dict[str, set[str] | None] = {}

    def add(mod, names):
        if mod in out and (out[mod] is None or names is None):
            out[mod] = None
        else:
            out[mod] = (out.get(mod) or set()) | (names or set()) if names is not None else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, None)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            add(node.module, {a.name for a in node.names})
            # `from qctfea.steps import fea` imports the module qctfea.steps.fea
            for a in node.names:
                if _module_file(f"{node.module}.{a.name}"):
                    add(f"{node.module}.{a.name}", None)
    return out


def _module_file(mod: str) -> Path | None:
    base = SRC / Path(*mod.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _reached(tree: ast.Module, names: set[str] | None) -> dict[str, set[str] | None]:
    """Imports that using `names` of a module (None: all of it) executes: the module-level
    imports, and those inside the named top-level functions and classes (all of them for
    None). Lazy imports inside functions that are not used are not counted."""
    if names is None:
        return _imports(tree)
    body = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))
            or n.name in names]
    return _imports(ast.Module(body=body, type_ignores=[]))


def _third_party(entries: dict[str, set[str] | None]) -> set[str]:
    """Top-level third-party modules that code reached from the entry points imports,
    following qctfea's own modules transitively (see _reached)."""
    todo, done, found = list(entries.items()), {}, set()
    while todo:
        mod, names = todo.pop()
        top = mod.split(".")[0]
        if top != "qctfea":
            found.add(top)
            continue
        prev = done.get(mod, set())
        if prev is None or (names is not None and names <= prev):
            continue
        done[mod] = None if names is None else prev | names
        path = _module_file(mod)
        if path is not None:
            todo += list(_reached(ast.parse(path.read_text()), names).items())
    return {m for m in found if m not in sys.stdlib_module_names and m != "__future__"}


def _entry(rule: dict) -> dict[str, set[str] | None]:
    """The modules (and names used from them) that a rule's code starts from."""
    if rule["script"]:
        script = (rule["file"].parent / rule["script"]).resolve()
        tree = ast.parse(script.read_text())
        entries = _imports(tree)
        # The step modules (qctfea.steps.imaging, .vertebra, .model, .fea) dispatch to the science
        # modules lazily, one step per function: the script's calls `steps_x.<function>`
        # say which of them it runs.
        # (`from qctfea.steps import model as steps_model`: the names used as steps_model.x)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "qctfea.steps":
                for a in node.names:
                    if f"qctfea.steps.{a.name}" in entries:
                        alias = a.asname or a.name
                        entries[f"qctfea.steps.{a.name}"] = {
                            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                            and isinstance(n.value, ast.Name) and n.value.id == alias}
        return entries
    commands = re.findall(r"qctfea ([\w-]+)", rule["shell"] or "")
    assert commands, f"rule {rule['name']}: neither a script nor a `qctfea <step>` command"
    # `qctfea <step>`: the command line's parsing (cli.run's other branches import the
    # cohort modules, which a solve never reaches) and each step's function.
    entries = {"qctfea.cli": {"main", "build_parser", "_params", "_ctx"}}
    for command in commands:
        step = {"solve": ("qctfea.steps.fea", "solve"),
                "solve-failed": ("qctfea.steps.fea", "solve_failed")}.get(command)
        assert step, f"rule {rule['name']}: map `qctfea {command}` to its steps function here"
        entries.setdefault(step[0], set()).add(step[1])
    return entries


def _pip_names() -> dict[str, list[str]]:
    return md.packages_distributions()


def test_env_files_parse_and_pin_every_package():
    assert {e.stem for e in ENVS} == {"imaging", "model", "fea", "cohort"}
    for env in ENVS:
        data = yaml.safe_load(env.read_text())
        assert data["channels"][0] == "conda-forge", env.name
        for name, (version, _) in _deps(env).items():
            assert re.fullmatch(r"\d+(\.\d+)*", version), f"{env.name}: {name} not pinned"
        post = env.with_name(f"{env.stem}.post-deploy.sh")
        assert post.is_file() and post.stat().st_mode & 0o111, f"{post.name} executable"
        assert "install-qctfea.sh" in post.read_text()


def test_every_rule_names_an_existing_environment():
    rules = _rules()
    assert len(rules) >= 15
    for r in rules:
        if not (r["script"] or r["shell"]):
            continue
        assert r["conda"], f"rule {r['name']} ({r['file'].name}) has no conda: directive"
        assert (r["file"].parent / r["conda"]).resolve().is_file(), r


@pytest.mark.parametrize("rule", [r for r in _rules() if r["script"] or r["shell"]],
                         ids=lambda r: r["name"])
def test_rule_environment_has_what_its_code_imports(rule):
    env = (rule["file"].parent / rule["conda"]).resolve()
    deps = _deps(env)
    provided = {CONDA_TO_PIP.get(n, n).lower().replace("_", "-") for n in deps}
    dists = _pip_names()
    needed = {}
    for top in _third_party(_entry(rule)):
        for dist in dists.get(top, [top]):
            if dist == "dolfinx-solver-real":
                # The wheel bundles what conda-forge splits: dolfinx is fenics-dolfinx,
                # petsc4py is petsc4py, and dolfinx_solver (an import-order bootstrap) is a
                # shim that the fea post-deploy script writes (envs/install-qctfea.sh).
                if top == "dolfinx_solver":
                    post = env.with_name(f"{env.stem}.post-deploy.sh")
                    assert "--dolfinx-shim" in post.read_text(), post
                    continue
                dist = {"dolfinx": "fenics-dolfinx"}.get(top, top)
            needed[dist.lower().replace("_", "-")] = top
    if rule["script"]:
        needed["snakemake"] = "snakemake (the script: directive)"
    missing = {d: m for d, m in needed.items() if d not in provided}
    assert not missing, f"rule {rule['name']}: {env.name} lacks {missing}"


def _installed(pip_name: str) -> str:
    """Installed version; DOLFINx and petsc4py come inside the dolfinx-solver-real wheel."""
    if pip_name in ("fenics-dolfinx", "petsc4py"):
        import dolfinx_solver  # noqa: F401

        mod = __import__({"fenics-dolfinx": "dolfinx"}.get(pip_name, pip_name))
        return re.sub(r"\.post\d+$", "", mod.__version__)
    return md.version(pip_name)


def test_pins_equal_the_pip_environment():
    """Every conda pin equals the installed version of the corresponding pip distribution
    (and requirements.txt's pin where it has one)."""
    req = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            req[name.strip().lower()] = version.strip()
    checked = 0
    for env in ENVS:
        for name, (version, build) in _deps(env).items():
            if name in NOT_PIP:
                continue
            pip = CONDA_TO_PIP.get(name, name)
            have = _installed(pip)
            assert have.split("+")[0] == version, f"{env.name}: {name}={version}, pip has {have}"
            if pip.lower() in req:
                assert req[pip.lower()] == version, f"{env.name}: {name} vs requirements.txt"
            checked += 1
    assert checked >= 30


def test_native_pins_match_the_wheel():
    """PETSc and MPICH: the conda pins are the libraries petsc4py and mpi4py run on here."""
    fea = _deps(REPO / "envs" / "fea.yaml")
    import dolfinx_solver  # noqa: F401
    from mpi4py import MPI
    from petsc4py import PETSc

    petsc = ".".join(str(v) for v in PETSc.Sys.getVersion())
    assert fea["petsc"][0] == petsc and fea["petsc"][1].startswith("real")
    lib = MPI.Get_library_version()
    m = re.search(r"MPICH Version:\s*([\d.]+)", lib)
    assert m, lib
    assert fea["mpich"][0] == m.group(1), lib
    assert fea["h5py"][1].startswith("mpi_mpich")


def test_python_pins_satisfy_requires_python():
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    low = tuple(int(x) for x in spec.removeprefix(">=").split("."))
    for env in ENVS:
        version = tuple(int(x) for x in _deps(env)["python"][0].split("."))
        assert version >= low, f"{env.name}: python {version} < {spec}"
