"""Packaging: what the wheel holds, and what each part of the package needs installed.

The runtime (``runtime.load`` and calls, CPU fallback) must need only torch, numpy and pyyaml; the command line
must start without the optional extras (tvm, postgres, plot). Both are checked in a subprocess whose imports of
everything else are refused by a meta path finder, so the test does not depend on what this venv happens to have.
.ci/wheel_smoke.sh checks the same from a real non-editable install of the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from sparvar_compiler._optional import MissingDependencyError, available, install_hint, require
from sparvar_compiler.errors import SparvarError

REPO = Path(__file__).resolve().parent.parent

# Everything but torch, numpy and pyyaml (and what those import themselves).
NOT_FOR_RUNTIME = ("sqlalchemy", "optuna", "jinja2", "triton", "tvm", "tvm_ffi", "matplotlib", "psycopg")
EXTRAS_ONLY = ("tvm", "tvm_ffi", "matplotlib", "psycopg")

# Installed first in the subprocess: refuses the named top-level packages as if they were not installed and prints,
# for each refusal, the chain of sparvar_compiler frames that asked (so a failure says which import pulls what).
_BLOCKER = """
import importlib.abc, sys, traceback
class _Refuse(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = frozenset(names)
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in self.names:
            return None
        chain = [f"{f.filename.rpartition('sparvar_compiler')[2].lstrip('/')}:{f.lineno}"
                 for f in traceback.extract_stack()[:-1] if "sparvar_compiler" in f.filename]
        print(f"refused import of {name} via " + (" -> ".join(chain) or "(not sparvar_compiler)"), file=sys.stderr)
        raise ModuleNotFoundError(f"No module named {name!r} (refused by test_packaging)", name=name)
sys.meta_path.insert(0, _Refuse(NAMES))
"""


def run_refusing(names: tuple[str, ...], code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the checkout importable) with imports of ``names`` refused."""
    script = _BLOCKER.replace("NAMES", repr(names)) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


# ---------------------------------------------------------------------------------------------- what imports need
def test_runtime_imports_with_torch_numpy_yaml_only():
    proc = run_refusing(NOT_FOR_RUNTIME, """
        import sparvar_compiler.runtime as rt
        assert callable(rt.load)
        print("imported")
    """)
    assert proc.returncode == 0 and "imported" in proc.stdout, _explain(proc)


@pytest.fixture(scope="module")
def small_module(tmp_path_factory):
    """A default-plan (CS4A + CSLA) module of a small model, emitted here with every dependency present."""
    from sparvar_compiler.emit.emitter import emit_module
    from sparvar_compiler.planner import PlanConfig, get_gpu, make_plan

    plan = make_plan("var-d16", config=PlanConfig(skip_last=0))
    out = tmp_path_factory.mktemp("pkg") / "var-d16-h100"
    emit_module(plan, get_gpu("h100"), out, db=None, block_sizes=(32,), progress=lambda s: None)
    return out


def test_runtime_loads_and_runs_a_default_module_with_torch_numpy_yaml_only(small_module):
    # One image in generation order (every scale) through layer 0 (dense / CS4A decision / CS4A) and the last
    # layer (dense / CSLA kernel), in CPU fallback mode.
    proc = run_refusing(NOT_FOR_RUNTIME, f"""
        import json
        import torch
        import sparvar_compiler.runtime as rt
        m = rt.load({str(small_module)!r}, device="cpu")
        man = m.manifest
        B, H, D = man["batch"], man["model"]["heads"], man["model"]["head_dim"]
        depth = man["model"]["depth"]
        ops = set()
        for s in man["plan"]["scales"]:
            q = torch.randn(B, H, s["tokens"], D, dtype=torch.bfloat16)
            k = torch.randn(B, H, s["kv_len"], D, dtype=torch.bfloat16)
            v = torch.randn(B, H, s["kv_len"], D, dtype=torch.bfloat16)
            for layer in (0, depth - 1):
                op = m.op(s["index"], layer)[0]
                if op == "skip":
                    continue
                o = m.attention(q, k, v, s["index"], layer)
                assert o.shape == q.shape and bool(torch.isfinite(o).all()), (s["index"], layer, op)
                ops.add(op)
        print(json.dumps(sorted(ops)))
    """)
    assert proc.returncode == 0, _explain(proc)
    assert {"sdpa", "kernel", "cs4a_decision", "cs4a"} <= set(json.loads(proc.stdout.splitlines()[-1]))


def test_command_line_starts_without_the_extras():
    proc = run_refusing(EXTRAS_ONLY, """
        from sparvar_compiler.cli import main
        for argv in (["--help"], ["fidelity", "--help"], ["calibrate", "--help"], ["tune", "--help"]):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code in (0, None), (argv, e.code)
        assert main(["plan", "--model", "var-d16"]) == 0
        print("started")
    """)
    assert proc.returncode == 0 and "started" in proc.stdout, _explain(proc)


# ---------------------------------------------------------------------------------------------- _optional
def test_require_names_the_extra_when_a_module_is_missing():
    with pytest.raises(MissingDependencyError) as e:
        require("sparvar_no_such_module.sub", "plot", "--plot")
    assert isinstance(e.value, SparvarError)
    assert str(e.value) == "sparvar_no_such_module is needed for --plot: pip install 'sparvar-compiler[plot]'"
    assert install_hint("tvm") == "pip install 'sparvar-compiler[tvm]'"
    assert require("json", "plot", "nothing") is json
    assert available("json") and not available("sparvar_no_such_module.sub")


def test_require_reports_a_broken_install_as_such(tmp_path, monkeypatch):
    pkg = tmp_path / "sparvar_broken_dep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import sparvar_missing_inner_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError) as e:
        require("sparvar_broken_dep", "tvm", "the TVM backend")
    msg = str(e.value)
    assert msg.startswith("sparvar_broken_dep is installed but does not import (")
    assert "sparvar_missing_inner_dependency" in msg and msg.endswith("pip install 'sparvar-compiler[tvm]'")


# ---------------------------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source tree (so the build writes nothing into the checkout), with this
    venv's setuptools and no network (``--no-build-isolation``)."""
    pytest.importorskip("setuptools", minversion="77")  # SPDX license expressions
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for name in ("sparvar_compiler", "templates", "tuning_db"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _explain(proc)
    (whl,) = dist.glob("sparvar_compiler-*.whl")
    return whl


def _dist_info(names) -> str:
    return next(n for n in names if n.endswith(".dist-info/METADATA")).split("/")[0]


def _files(root: Path, pattern: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.glob(pattern) if "__pycache__" not in p.parts}


def test_wheel_holds_every_module_template_and_database(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {f"sparvar_compiler/{f}" for f in _files(REPO / "sparvar_compiler", "**/*.py")}
    assert code - names == set(), "modules missing from the wheel (a sub-package without __init__.py?)"
    templates = _files(REPO / "templates", "**/*.jinja")
    assert any(t.startswith("triton/") for t in templates) and any(t.startswith("tvm/") for t in templates)
    assert {f"sparvar_compiler/templates/{t}" for t in templates} <= names
    data = _files(REPO / "tuning_db", "*.sqlite") | _files(REPO / "tuning_db", "*.json")
    assert "sparvar.sqlite" in data and {f"sparvar_compiler/tuning_db/{d}" for d in data} <= names
    assert {"sparvar_compiler/templates/__init__.py", "sparvar_compiler/tuning_db/__init__.py"} <= names
    # Nothing outside the package at the top level (no stray "templates" or "tests" package).
    assert {n.split("/")[0] for n in names} == {"sparvar_compiler", _dist_info(names)}


def test_wheel_metadata_license_and_extras(wheel):
    with zipfile.ZipFile(wheel) as z:
        info = _dist_info(z.namelist())
        meta = z.read(f"{info}/METADATA").decode()
        license_text = z.read(f"{info}/licenses/LICENSE").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "the sparvar-compiler authors" in license_text
    lines = meta.splitlines()
    assert "License-Expression: Apache-2.0" in lines and "License-File: LICENSE" in lines
    assert "sparvar-compile = sparvar_compiler.cli:main" in entry_points
    core = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    core_names = {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for r in core}
    assert core_names == {"torch", "triton", "numpy", "optuna", "sqlalchemy", "pyyaml", "jinja2"}
    extras = {ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Provides-Extra:")}
    assert {"tvm", "postgres", "plot", "test", "all"} <= extras
    tvm_ffi = [ln for ln in lines if ln.startswith("Requires-Dist: apache-tvm-ffi")]
    assert tvm_ffi and "==" not in tvm_ffi[0].split(";")[0] and "<0.1.15" in tvm_ffi[0], tvm_ffi  # a range


def test_resources_find_the_data_directories_from_the_checkout():
    # From a checkout (PYTHONPATH=.), the two data packages resolve to the top-level directories.
    proc = subprocess.run([sys.executable, "-c", "from sparvar_compiler.resources import data_dir; "
                           "print(data_dir('templates')); print(data_dir('tuning_db'))"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, _explain(proc)
    templates, tuning_db = (Path(p) for p in proc.stdout.split())
    assert (templates / "triton").is_dir() and (tuning_db / "sparvar.sqlite").is_file()
