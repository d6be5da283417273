"""A runtime module is checked, never trusted: every field of the manifest's schema tampered with, the digest
sidecar, symlinks, FIFOs, unlisted and swapped files, arrays that disagree with the manifest, and module sets
with a tampered member or pool file. Each case ends in one :class:`ModuleError` naming the field or file (or,
where a module stays within the schema, in correct behaviour), never a KeyError, TypeError or IndexError.

Most cases rewrite the manifest *and* its digest (what a deliberate editor would do), so that the schema is what
refuses them; the digest cases edit the manifest alone."""

import copy
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import sparvar_compiler.runtime as rt
from sparvar_compiler.cli import main
from sparvar_compiler.codegen.artifact import CompiledKernel, KernelMetaError
from sparvar_compiler.codegen.spec import DTYPES
from sparvar_compiler.emit.emitter import emit_module
from sparvar_compiler.emit.manifest import (DTYPE_NAMES, MODES, ModuleError, check_manifest, check_set_manifest,
                                            verify_module, write_manifest)
from sparvar_compiler.emit.moduleset import emit_module_set, verify_module_set
from sparvar_compiler.planner import Mode, PlanConfig, get_gpu, get_model, make_plan

DELETE = object()  # a tamper value: remove the key


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A module without CS4A: three CSLA kernels (scales 7-9 of var-d16 at 32x32 blocks)."""
    out = tmp_path_factory.mktemp("small") / "var-d16-h100"
    emit_module(make_plan("var-d16", config=PlanConfig(cs4a="off")), get_gpu("h100"), out, block_sizes=(32,),
                progress=_quiet)
    return out


@pytest.fixture(scope="module")
def with_cs4a(tmp_path_factory):
    """The default plan: token top-k CS4A decided at scale 7, dynamic kernels at scales 7 (residual), 8, 9."""
    out = tmp_path_factory.mktemp("cs4a") / "var-d16-cs4a-h100"
    emit_module(make_plan("var-d16"), get_gpu("h100"), out, block_sizes=(32,), progress=_quiet)
    return out


TINY = """\
name: tiny-infinity
family: infinity
depth: 3
width: 128
heads: 2
head_dim: 64
schedules:
  - {resolution: 256, aspect: "1:1", scales: "1,2,4,6,8,12,16"}
  - {resolution: 256, aspect: "4:3", scales: "1,2,4x3,8x6,12x9,16x12,20x15"}
"""


@pytest.fixture(scope="module")
def module_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    (root / "tiny.yaml").write_text(TINY)
    out = root / "tiny-all-h100"
    emit_module_set(get_model(str(root / "tiny.yaml")), 256, ("1:1", "4:3"), get_gpu("h100"), out,
                    block_sizes=(32,), progress=_quiet)
    return out


def _copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _rewrite(d: Path, manifest: dict, name: str = "manifest") -> None:
    """Write ``manifest`` and a matching digest, as someone who edits both would (no schema check)."""
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    (d / f"{name}.json").write_bytes(data)
    (d / f"{name}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}.json\n")


def _rehash(d: Path, manifest: dict, rel: str) -> None:
    """Record the new content of the module's file ``rel`` in the manifest (and the kernel record naming it)."""
    digest = hashlib.sha256((d / rel).read_bytes()).hexdigest()
    manifest["files"][rel] = digest
    for k in [*manifest["kernels"].values(), *((manifest.get("cs4a") or {}).get("scales") or {}).values()]:
        if k["binary"] == rel:
            k["meta"]["sha256"] = digest


def _row(manifest: dict, scale: int, layer: int) -> int:
    return next(i for i, r in enumerate(manifest["dispatch"]) if (r["scale"], r["layer"]) == (scale, layer))


def _resolve(manifest: dict, path: tuple) -> tuple:
    """Placeholders: ``<K>`` the first kernel, ``<K9>`` the kernel of scale 9, ``<ROW>`` the dispatch row of
    scale 9's last layer (a ``kernel`` row), ``<DEC>``/``<LATER>`` a ``cs4a_decision``/``cs4a`` row."""
    if not any(isinstance(p, str) and p.startswith("<") for p in path):
        return path
    names = sorted(manifest["kernels"])
    rows = {"<ROW>": lambda: _row(manifest, 9, manifest["model"]["depth"] - 1),
            "<DEC>": lambda: _row(manifest, manifest["cs4a"]["decision_scale"], 0),
            "<LATER>": lambda: _row(manifest, 8, 0)}
    out = []
    for p in path:
        if p == "<K>":
            p = names[0]
        elif p == "<K9>":
            p = next(n for n in names if manifest["kernels"][n]["scale"] == 9)
        elif p in rows:
            p = rows[p]()
        out.append(p)
    return tuple(out)


def _set(manifest: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(manifest)
    path = _resolve(doc, path)
    holder = doc
    for key in path[:-1]:
        holder = holder[key]
    if value is DELETE:
        del holder[path[-1]]
    elif isinstance(holder, list) and path[-1] == len(holder):
        holder.append(value)
    else:
        holder[path[-1]] = value
    return doc


def _refused(d: Path, fragment: str) -> str:
    """verify and load both refuse ``d`` with ``fragment`` in one line; returns the message."""
    with pytest.raises(ModuleError) as verify_error:
        verify_module(d)
    with pytest.raises(ModuleError) as load_error:
        rt.load(d, device="cpu")
    message = str(verify_error.value)
    assert fragment in message and fragment in str(load_error.value), message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- the schema
BAD_VALUE = "not a valid value"
SCHEMA_CASES = [
    # top level
    (("format",), "sparvar-modul", "not a sparvar runtime module manifest"),
    (("format_version",), 3, "module format version 3, this sparvar reads version 4"),
    (("format_version",), "4", "module format version '4'"),
    (("sparvar_version",), 5, "sparvar_version: must be text"),
    (("created_unix",), -1, "created_unix: -1 is out of range"),
    (("surprise",), 1, "manifest (top level): unknown key 'surprise'"),
    (("dispatch",), DELETE, "manifest (top level): has no 'dispatch'"),
    (("kernels",), DELETE, "has no 'kernels'"),
    (("files",), DELETE, "has no 'files'"),
    (("target",), DELETE, "has no 'target'"),
    (("cs4a",), DELETE, "has no 'cs4a'"),
    (("cs4a",), {}, "cs4a: the plan has no CS4A layer"),
    (("cs4a_tuned",), False, "cs4a_tuned: must be null without a cs4a section"),
    (("tuned",), "no", "tuned: must be true or false"),
    (("environment",), "x", "environment: must be an object"),
    (("environment", "torch"), {"deep": 1}, "environment.torch: must be a scalar"),
    (("batch",), 0, "batch: 0 is out of range 1..4096"),
    (("batch",), 10**9, "batch: 1000000000 is out of range"),
    (("batch",), 4, "spec.batch: 2 does not match the module's batch (4)"),
    (("batch",), 2.0, "batch: must be an integer"),
    (("dtype",), "fp8", "dtype: 'fp8' is not one of bf16, fp16, fp32"),
    (("dtype",), "fp16", "spec.dtype: 'bf16' does not match the module's dtype"),
    (("softmax_scale",), -0.125, "softmax_scale: -0.125 is out of range"),
    (("softmax_scale",), 0, "softmax_scale: 0 is out of range (0.0"),
    (("softmax_scale",), "0.125", "softmax_scale: must be a finite number"),
    (("softmax_scale_kind",), "explicit", "spec.scale_kind: 'default' does not match softmax_scale_kind"),
    (("softmax_scale_kind",), "learned", "softmax_scale_kind: 'learned' is not one of"),
    # model and schedule
    (("model", "name"), "../x", "model.name: must be a name"),
    (("model", "name"), "other", "plan.model: 'var-d16' does not match model.name"),
    (("model", "family"), "gpt", "model.family: 'gpt' is not one of"),
    (("model", "depth"), 10**9, "model.depth: 1000000000 is out of range 1..1024"),
    (("model", "depth"), "16", "model.depth: must be an integer"),
    (("model", "heads"), True, "model.heads: must be an integer"),
    (("model", "head_dim"), 0, "model.head_dim: 0 is out of range"),
    (("model", "head_dim"), DELETE, "model: has no 'head_dim'"),
    (("model", "width"), 1024, "model: unknown key 'width'"),
    (("model",), [], "model: must be an object"),
    (("schedule", "resolution"), 512, "schedule.resolution: 512 does not match plan.resolution"),
    (("schedule", "grids"), [[1, 1]], "schedule.grids"),
    # plan
    (("plan", "depth"), 17, "plan.depth: 17 does not match model.depth"),
    (("plan", "grids"), [], "plan.grids: must list at least one scale"),
    (("plan", "grids", 0), [1, 2], "plan.scales[0].w: 1 does not match plan.grids[0][1]"),
    (("plan", "grids", 0), [1000, 1000], "plan.grids[0][0]: 1000 is out of range 1..512"),
    (("plan", "grids", 0), "1x1", "plan.grids[0]: must be a list"),
    (("plan", "resolution"), -256, "plan.resolution: -256 is out of range"),
    (("plan", "aspect"), "../../x", "plan.aspect: must be a name"),
    (("plan", "config", "group_size"), 0, "group_size"),
    (("plan", "config", "bogus"), 1, "plan.config: unknown key 'bogus'"),
    (("plan", "config", "windows"), [1, 2, 3], "windows has 3 entries but the schedule has 10 scales"),
    (("plan", "config", "windows"), None, "plan.config.windows: None is not what the planner resolves"),
    (("plan", "config", "bound_layer"), 99, "bound_layer 99 is out of range"),
    (("plan", "config", "decision_scale"), DELETE, "plan.config: has no 'decision_scale'"),
    (("schedule", "grids", 0, 0), True, "schedule.grids: "),
    (("kernels", "<K>", "meta", "spec", "token_exact"), 0, ".meta.spec.token_exact: 0 does not match the kernel's "
                                                           "spec (False)"),
    (("plan", "config"), "x", "plan.config"),
    (("plan", "scales"), "x", "plan.scales: must be a list"),
    (("plan", "scales", 3, "index"), 4, "plan.scales[3].index: 4 does not match its position"),
    (("plan", "scales", 3, "tokens"), 17, "plan.scales[3].tokens: 17 does not match h * w"),
    (("plan", "scales", 3, "kv_offset"), 0, "plan.scales[3].kv_offset: 0 does not match"),
    (("plan", "scales", 3, "kv_len"), 31, "plan.scales[3].kv_len: 31 does not match kv_offset + tokens"),
    (("plan", "scales", 3, "kv_len"), DELETE, "plan.scales[3]: has no 'kv_len'"),
    (("plan", "scales", 3, "modes", 0), "fast", "plan.scales[3].modes[0]: 'fast' is not one of"),
    (("plan", "scales", 3, "modes"), ["dense"], "plan.scales[3].modes: has 1 entries, expected 16"),
    (("plan", "scales", 3, "extra"), 1, "plan.scales[3]: unknown key 'extra'"),
    (("plan", "scales", 3), None, "plan.scales[3]: must be an object"),
    # target
    (("target", "name"), "a100", "target.arch: 'sm_90' does not match a100's arch ('sm_80')"),
    (("target", "name"), "tpu-v5", "target.name: 'tpu-v5' is not one of"),
    (("target", "sm_count"), 114, "target.sm_count: 114 does not match h100's SM count (132)"),
    (("target", "arch"), "sm_80", "target.arch: 'sm_80' does not match h100's arch"),
    (("target", "l2_bytes"), -1, "target.l2_bytes: -1 is out of range"),
    (("target", "smem_per_block"), 1024, "meta.shared_bytes: 14340 is more than h100's 1024 bytes per block"),
    # kernels
    (("kernels",), [], "kernels: must be an object"),
    (("kernels", "<K>", "scale"), 0, "kernels.scale7_triton_block_32x32.scale: scale 0 has no CSLA layer"),
    (("kernels", "<K>", "scale"), 99, "kernels.scale7_triton_block_32x32.scale: 99 is out of range 0..9"),
    (("kernels", "<K>", "scale"), -1, ".scale: -1 is out of range 0..9"),
    (("kernels", "<K>", "scale"), 8, ".spec.q_len: 100 does not match the tokens of scale 8 (169)"),
    (("kernels", "<K>", "binary"), "/etc/passwd", ".binary: '/etc/passwd' is not a normalised relative path "
                                                  "inside the module"),
    (("kernels", "<K>", "layout_file"), "/etc/passwd", ".layout_file: '/etc/passwd' is not a normalised relative "
                                                       "path inside the module"),
    (("kernels", "<K>", "layout_file"), "../x.npz", ".layout_file: '../x.npz' is not a normalised relative path"),
    (("kernels", "<K>", "layout_file"), "layouts/../../x.npz", "is not a normalised relative path"),
    (("kernels", "<K>", "layout_file"), "layouts/./x.npz", "is not a normalised relative path"),
    (("kernels", "<K>", "layout_file"), "layouts//x.npz", "is not a normalised relative path"),
    (("kernels", "<K>", "layout_file"), "layouts\\x.npz", "is not a normalised relative path"),
    (("kernels", "<K>", "layout_file"), "layouts/other.npz", ".layout_file: refers to layouts/other.npz, which is "
                                                             "not listed in files"),
    (("kernels", "<K>", "layout_file"), 7, ".layout_file: 7 is not a normalised relative path"),
    (("kernels", "<K>", "layout"), "README.txt", ".layout: README.txt must be a .npz file"),
    (("kernels", "<K>", "layout_hash"), "0" * 64, ".spec.layout_hash: 'a"),
    (("kernels", "<K>", "layout_hash"), "zz", ".layout_hash: must be a sha256"),
    (("kernels", "<K>", "tuned"), 1, ".tuned: must be true or false"),
    (("kernels", "<K>", "source"), ["x"], ".source: must be text"),
    (("kernels", "<K>", "expected_ms"), -1.0, ".expected_ms: -1.0 is out of range"),
    (("kernels", "<K>", "sparsity"), 1.5, ".sparsity: 1.5 is out of range [0.0, 1.0]"),
    (("kernels", "<K>", "tables"), ["kv_num"], ".meta.params: "),
    (("kernels", "<K>", "tables"), ["kv_num", "kv_num"], ".tables: lists a table twice"),
    (("kernels", "<K>", "tables"), ["kv_num", "KV IDX"], ".tables[1]: must be a name"),
    (("kernels", "<K>", "spec", "q_len"), 99, ".spec.q_len: 99 does not match the tokens of scale 7 (100)"),
    (("kernels", "<K>", "spec", "kv_len"), 256, ".spec.kv_len: 256 does not match the kv_len of scale 7"),
    (("kernels", "<K>", "spec", "heads"), 8, ".spec.heads: 8 does not match model.heads"),
    (("kernels", "<K>", "spec", "kind"), "magic", ".spec.kind: 'magic' is not one of block, gather"),
    (("kernels", "<K>", "spec", "token_exact"), "yes", ".spec.token_exact: must be true or false"),
    (("kernels", "<K>", "spec", "dynamic"), True, ".spec: unknown key 'dynamic'"),
    (("kernels", "<K>", "spec"), DELETE, "kernels.scale7_triton_block_32x32: has no 'spec'"),
    (("kernels", "<K>", "config"), [1], ".config: must be an object"),
    (("kernels", "<K>", "config", "num_warps"), 8, ".meta.config.num_warps: 4 does not match the kernel's config "
                                                   "(8)"),
    (("kernels", "<K>", "extra"), 1, "kernels.scale7_triton_block_32x32: unknown key 'extra'"),
    (("kernels", "<K>"), "x", "kernels.scale7_triton_block_32x32: must be an object"),
    # a kernel's launch record
    (("kernels", "<K>", "meta"), DELETE, "has no 'meta'"),
    (("kernels", "<K>", "meta"), [], ".meta: must be an object"),
    (("kernels", "<K>", "meta", "grid"), DELETE, ".meta: has no 'grid'"),
    (("kernels", "<K>", "meta", "grid"), [4, 32], ".meta.grid: must be a list of three sizes"),
    (("kernels", "<K>", "meta", "grid", 0), 0, ".meta.grid[0]: 0 is out of range 1..2147483647"),
    (("kernels", "<K>", "meta", "grid", 1), 70000, ".meta.grid[1]: 70000 is out of range 1..65535"),
    (("kernels", "<K>", "meta", "grid", 2), 1.5, ".meta.grid[2]: must be an integer"),
    (("kernels", "<K>", "meta", "block"), [2048, 1, 1], ".meta.block[0]: 2048 is out of range 1..1024"),
    (("kernels", "<K>", "meta", "block"), [64, 64, 1], ".meta.block: [64, 64, 1] is 4096 threads"),
    (("kernels", "<K>", "meta", "block", 2), 65, ".meta.block[2]: 65 is out of range 1..64"),
    (("kernels", "<K>", "meta", "block"), [1, 2, 3], ".meta.block: [1, 2, 3] does not match 32 threads per warp of "
                                                     "its config ([128, 1, 1])"),
    (("kernels", "<K>", "meta", "grid", 0), 5, ".meta.grid: [5, 32, 1] does not match the grid of its spec and "
                                               "config ([4, 32, 1])"),
    (("kernels", "<K>", "meta", "params"), "x", ".meta.params: must be a list"),
    (("kernels", "<K>", "meta", "params", 0, "kind"), "ptr64", ".meta.params[0].kind: must be one of ptr"),
    (("kernels", "<K>", "meta", "params", 1, "name"), "q", ".meta.params[1].name: q is listed twice"),
    (("kernels", "<K>", "meta", "params", 1, "name"), "k; rm", ".meta.params[1].name: must be an identifier"),
    (("kernels", "<K>", "meta", "params", 0, "nbytes"), 64, ".meta.params[0].nbytes: only a scratch parameter"),
    (("kernels", "<K>", "meta", "params", 7, "nbytes"), -1, ".meta.params[7].nbytes: -1 is out of range"),
    (("kernels", "<K>", "meta", "params", 0), DELETE, ".meta.params: "),
    (("kernels", "<K>", "meta", "arch"), "sm_80", ".meta.arch: sm_80 is not the target's arch (sm_90)"),
    (("kernels", "<K>", "meta", "arch"), "gfx90a", ".meta.arch: must be a CUDA arch"),
    (("kernels", "<K>", "meta", "backend"), "cuda", ".meta.backend: 'cuda' is not one of triton, tvm"),
    (("kernels", "<K>", "meta", "entry"), "x; rm -rf /", ".meta.entry: must be a kernel symbol name"),
    (("kernels", "<K>", "meta", "binary_format"), "ptx", ".meta.binary_format: ptx does not match the file name"),
    (("kernels", "<K>", "meta", "binary_format"), "elf", ".meta.binary_format: must be one of cubin"),
    (("kernels", "<K>", "meta", "shared_bytes"), 300_000, ".meta.shared_bytes: 300000 is more than h100's"),
    (("kernels", "<K>", "meta", "shared_bytes"), -1, ".meta.shared_bytes: -1 is out of range"),
    (("kernels", "<K>", "meta", "resources", "registers"), -1, ".meta.resources.registers: -1 is out of range"),
    (("kernels", "<K>", "meta", "batch"), 3, ".meta.batch_grid: [1, 16] does not match grid [4, 32, 1] at batch 3"),
    (("kernels", "<K>", "meta", "batch"), DELETE, ".meta: has no 'batch'"),
    (("kernels", "<K>", "meta", "batch_grid"), [1, 5], ".meta.batch_grid: [1, 5] does not match grid"),
    (("kernels", "<K>", "meta", "batch_grid"), [3, 16], ".meta.batch_grid[0]: 3 is out of range 0..2"),
    (("kernels", "<K>", "meta", "batch_grid"), "1,16", ".meta.batch_grid: must be null or [axis, extent]"),
    (("kernels", "<K>", "meta", "batch_scalars"), {"q": 2}, ".meta.batch_scalars.q: not an integer parameter"),
    (("kernels", "<K>", "meta", "batch_scalars"), None, ".meta.batch_scalars: must be an object"),
    (("kernels", "<K>", "meta", "sha256"), "0" * 64, ".meta.sha256: '0000"),
    (("kernels", "<K>", "meta", "sha256"), "xyz", ".meta.sha256: must be 64 lower-case hex digits"),
    (("kernels", "<K>", "meta", "spec"), {}, ".meta.spec: has no 'backend' (the kernel's spec)"),
    (("kernels", "<K>", "meta", "config", "num_warps"), 8, ".meta.config.num_warps: 8 does not match the kernel's "
                                                           "config (4)"),
    (("kernels", "<K>", "meta", "extra"), 1, ".meta: unknown key 'extra'"),
    # dispatch
    (("dispatch",), "x", "dispatch: must be a list"),
    (("dispatch", "<ROW>", "layer"), -1, "dispatch[159].layer: -1 is out of range 0..15"),
    (("dispatch", "<ROW>", "scale"), -1, "dispatch[159].scale: -1 is out of range 0..9"),
    (("dispatch", "<ROW>", "scale"), 12, "dispatch[159].scale: 12 is out of range 0..9"),
    (("dispatch", "<ROW>", "scale"), "9", "dispatch[159].scale: must be an integer"),
    (("dispatch", "<ROW>", "scale"), 8, "dispatch[159]: scale 8 layer 15 is listed twice (first at dispatch[143])"),
    (("dispatch", "<ROW>", "op"), "rm -rf", "dispatch[159].op: 'rm -rf' is not one of sdpa, kernel, cs4a, "
                                            "cs4a_decision, skip"),
    (("dispatch", "<ROW>", "op"), "sdpa", "dispatch[159].op: sdpa where the plan's mode csla runs kernel"),
    (("dispatch", "<ROW>", "op"), None, "dispatch[159].op: None is not one of"),
    (("dispatch", "<ROW>", "kernel"), "nope", "dispatch[159].kernel: 'nope' is not a kernel of the module"),
    (("dispatch", "<ROW>", "kernel"), None, "dispatch[159].kernel: None is not a kernel of the module"),
    (("dispatch", "<ROW>", "kernel"), "<K>", "dispatch[159].kernel: scale7_triton_block_32x32 is the kernel of "
                                             "scale 7, not of scale 9"),
    (("dispatch", "<ROW>", "mode"), "dense", "dispatch[159].mode: 'dense' does not match plan.scales[9].modes[15]"),
    (("dispatch", "<ROW>", "note"), 5, "dispatch[159].note: must be text"),
    (("dispatch", "<ROW>", "extra"), 1, "dispatch[159]: unknown key 'extra'"),
    (("dispatch", "<ROW>", "op"), DELETE, "dispatch[159]: has no 'op'"),
    (("dispatch", "<ROW>"), DELETE, "dispatch: has no row for scale 9 layer 15"),
    (("dispatch", "<ROW>"), [9, 15, "kernel"], "dispatch[159]: must be an object"),
    (("dispatch", 0, "kernel"), "<K>", "dispatch[0].kernel: must be null for op sdpa"),
    (("dispatch", 160), {"scale": -1, "layer": -1, "mode": "csla", "op": "kernel", "kernel": "<K>", "note": ""},
     "dispatch[160].scale: -1 is out of range 0..9"),
    # files
    (("files",), [], "files: must map at most"),
    (("files", "/etc/passwd"), "0" * 64, "files['/etc/passwd']: '/etc/passwd' is not a normalised relative path"),
    (("files", "../outside.txt"), "0" * 64, "files['../outside.txt']: '../outside.txt' is not a normalised"),
    (("files", "manifest.json"), "0" * 64, "files['manifest.json']: 'manifest.json' is not a normalised"),
    (("files", "README.txt"), "xyz", "files['README.txt']: must be a sha256"),
    (("files", "README.txt"), None, "files['README.txt']: must be a sha256"),
    (("shared_files",), {"README.txt": "0" * 64}, "shared_files['README.txt']: is also listed in files"),
    (("shared_files",), {"../x.cubin": "0" * 64}, "shared_files['../x.cubin']: '../x.cubin' is not a normalised"),
    (("shared_files",), [], "shared_files: must map"),
]


def _case_id(case) -> str:
    path, value, _ = case
    shown = "DELETE" if value is DELETE else repr(value)[:20]
    return ".".join(str(p) for p in path) + "=" + shown


@pytest.mark.parametrize("path,value,fragment", SCHEMA_CASES, ids=[_case_id(c) for c in SCHEMA_CASES])
def test_each_schema_field_is_checked(small, tmp_path, path, value, fragment):
    original = _manifest(small)
    if isinstance(value, dict):
        value = {k: (_resolve(original, ("<K>",))[0] if v == "<K>" else v) for k, v in value.items()}
    value = _resolve(original, (value,))[0] if value == "<K>" else value
    bad = _set(original, path, value)
    with pytest.raises(ModuleError) as e:
        check_manifest(bad)
    assert fragment in str(e.value)
    d = _copy(small, tmp_path)
    _rewrite(d, bad)
    _refused(d, fragment)


CS4A_CASES = [
    (("cs4a",), None, "cs4a: is null but the plan runs CS4A at scale 8"),
    (("cs4a",), [], "cs4a: must be an object"),
    (("cs4a", "mode"), "block", "cs4a.mode: 'block' does not match plan.config.cs4a ('token')"),
    (("cs4a", "mapping"), "flat", "cs4a.mapping: 'flat' does not match plan.config.key_mapping"),
    (("cs4a", "residual"), "yes", "cs4a.residual: 'yes' does not match plan.config.residual"),
    (("cs4a", "decision_scale"), 8, "cs4a.decision_scale: 8 does not match plan.config.decision_scale"),
    (("cs4a", "bound_layer"), -1, "cs4a.bound_layer: -1 does not match"),
    (("cs4a", "coverage"), 2.0, "cs4a.coverage: 2.0 does not match"),
    (("cs4a", "group"), 0, "cs4a.group: 0 does not match plan.config.group_size (192)"),
    (("cs4a", "topk"), DELETE, "cs4a: has no 'topk'"),
    (("cs4a", "stats"), DELETE, "cs4a: has no 'stats'"),
    (("cs4a", "stats", "binary"), "kernels/../x.cubin", "cs4a.stats.binary: 'kernels/../x.cubin' is not a "
                                                       "normalised relative path"),
    (("cs4a", "stats", "spec", "group"), 64, "cs4a.stats.spec.group: 64 does not match the decision scale's "
                                             "statistics (192)"),
    (("cs4a", "stats", "meta", "params", 2, "name"), "lse2", "cs4a.stats.meta.params: "),
    (("cs4a", "stats", "meta", "block", 0), 4096, "cs4a.stats.meta.block[0]: 4096 is out of range 1..1024"),
    (("cs4a", "stats", "tuned"), None, "cs4a.stats.tuned: must be true or false"),
    (("cs4a", "topk", "spec", "k"), 1, "cs4a.topk.spec.k: 1 does not match the decision scale's selection "
                                       "(112)"),
    (("cs4a", "topk", "meta", "params", 1, "name"), "result", "cs4a.topk.meta.params"),
    (("cs4a", "scales"), [], "cs4a.scales: must be an object keyed by scale"),
    (("cs4a", "scales", "9"), DELETE, "cs4a.scales: ['7', '8'] does not match the scales that run CS4A "
                                        "kernels (['7', '8', '9'])"),
    (("cs4a", "scales", "7"), DELETE, "does not match the scales that run CS4A kernels"),
    (("cs4a", "scales", "-1"), {}, "does not match the scales that run CS4A kernels"),
    (("cs4a", "scales", "8", "tables_file"), "/etc/passwd", "cs4a.scales.8.tables_file: '/etc/passwd' is not a "
                                                            "normalised relative path"),
    (("cs4a", "scales", "8", "tables_file"), "../x.npz", "cs4a.scales.8.tables_file: '../x.npz' is not"),
    (("cs4a", "scales", "8", "tables_file"), "layouts/cs4a_scale9_gather.tables.npz", None),  # load: shapes
    (("cs4a", "scales", "8", "binary"), "README.txt", None),  # the meta's sha256 is the binary's listed one
    (("cs4a", "scales", "8", "tables", "topk"), 10**9, "cs4a.scales.8.tables.topk: 1000000000 is out of range "
                                                       "1..255"),
    (("cs4a", "scales", "8", "tables", "topk"), 100, "cs4a.scales: the tables of the scales disagree"),
    (("cs4a", "scales", "8", "tables", "scale"), 9, "cs4a.scales.8.tables.scale: 9 does not match its key"),
    (("cs4a", "scales", "8", "tables", "q_len"), 1, "cs4a.scales.8.tables.q_len: 1 does not match the tokens"),
    (("cs4a", "scales", "8", "tables", "kind"), "block", "cs4a.scales.8.tables.kind: 'block' does not match"),
    (("cs4a", "scales", "8", "tables", "capacity"), 10**9, "cs4a.scales.8.tables.capacity: 1000000000 is out of"),
    (("cs4a", "scales", "8", "tables", "dedup"), 1, "cs4a.scales.8.tables.dedup: must be true or false"),
    (("cs4a", "scales", "8", "tables", "decision_kv_len"), 10, "tables.decision_kv_len: 10 does not match"),
    (("cs4a", "scales", "8", "tables", "extra"), 1, "cs4a.scales.8.tables: unknown key 'extra'"),
    (("cs4a", "scales", "8", "spec", "capacity"), 1, "cs4a.scales.8.spec.capacity: 1 does not match "
                                                     "cs4a.scales.8.tables.capacity"),
    (("cs4a", "scales", "8", "spec", "kind"), "block", "cs4a.scales.8.spec.kind: 'block' does not match"),
    (("cs4a", "scales", "8", "spec", "dynamic"), DELETE, "cs4a.scales.8.spec.dynamic: None does not match"),
    (("cs4a", "scales", "8", "meta", "grid", 0), 0, "cs4a.scales.8.meta.grid[0]: 0 is out of range"),
    (("cs4a", "scales", "8", "meta", "arch"), "sm_100a", "cs4a.scales.8.meta.arch: sm_100a is not the target's"),
    (("cs4a", "scales", "8", "name"), "a/b", "cs4a.scales.8.name: must be a name"),
    (("cs4a_tuned",), None, "cs4a_tuned: must be true or false"),
    (("dispatch", "<LATER>", "op"), "sdpa", "dispatch[128].op: sdpa where the plan's mode cs4a runs cs4a"),
    (("dispatch", "<DEC>", "op"), "sdpa", "dispatch[112].op: sdpa where the plan's mode decision runs "
                                          "cs4a_decision"),
    (("dispatch", "<LATER>", "op"), "cs4a_decision", "dispatch[128].op: cs4a_decision where the plan's mode cs4a"),
    (("dispatch", "<LATER>", "kernel"), "<K>", "dispatch[128].kernel: must be null for op cs4a"),
]


@pytest.mark.parametrize("path,value,fragment", CS4A_CASES, ids=[_case_id(c) for c in CS4A_CASES])
def test_each_cs4a_field_is_checked(with_cs4a, tmp_path, path, value, fragment):
    original = _manifest(with_cs4a)
    value = _resolve(original, (value,))[0] if value == "<K>" else value
    bad = _set(original, path, value)
    d = _copy(with_cs4a, tmp_path)
    _rewrite(d, bad)
    if fragment is None:  # within the schema: the loader's own checks refuse it
        with pytest.raises(ModuleError):
            check_manifest(bad) if path[-1] == "binary" else rt.load(d, device="cpu")
        return
    with pytest.raises(ModuleError) as e:
        check_manifest(bad)
    assert fragment in str(e.value)
    _refused(d, fragment)


def test_the_emitted_modules_pass_the_schema(small, with_cs4a):
    for d in (small, with_cs4a):
        check_manifest(_manifest(d))
        assert verify_module(d, gpu="h100")["target"]["name"] == "h100"
    assert set(DTYPE_NAMES) == set(DTYPES) and set(MODES) == {m.value for m in Mode}


def test_write_manifest_refuses_what_the_loader_would(small, tmp_path):
    bad = _set(_manifest(small), ("dispatch", 0, "op"), "rm -rf")
    with pytest.raises(ModuleError, match="dispatch.0..op"):
        write_manifest(tmp_path, bad)
    assert not list(tmp_path.iterdir())


def _paths(value, path=()):
    """Every path of a manifest, one element of each repeated structure (a list's first and last entries, one
    kernel, one CS4A scale) standing for the others."""
    yield path
    if isinstance(value, dict):
        keys = list(value)
        if path[-1:] in (("kernels",), ("scales",)) and isinstance(value, dict):
            keys = keys[:1]
        for key in keys:
            yield from _paths(value[key], path + (key,))
    elif isinstance(value, list):
        for i in sorted({0, len(value) - 1} if value else set()):
            yield from _paths(value[i], path + (i,))


def test_no_mutation_escapes_as_a_crash(small, with_cs4a):
    """Every value of the manifest replaced by each of a few hostile ones, or removed: check_manifest refuses it
    with a ModuleError or accepts it - never KeyError, TypeError, IndexError or anything else - and what it
    accepts, the loader loads."""
    hostile = [None, -1, 0, 2**63, 1.5, float("nan"), "", "../x", [], {}, True, [1, 2, 3]]
    for d in (small, with_cs4a):
        manifest = _manifest(d)
        accepted = []
        for path in list(_paths(manifest))[1:]:
            holder = manifest
            for key in path[:-1]:
                holder = holder[key]
            key = path[-1]
            old = holder[key]
            for value in hostile + [DELETE]:
                if value is DELETE:
                    del holder[key]
                else:
                    holder[key] = value
                try:
                    check_manifest(manifest)
                    accepted.append((path, value))
                except ModuleError:
                    pass
                finally:
                    if value is DELETE and isinstance(holder, list):
                        holder.insert(key, old)
                    else:
                        holder[key] = old
        assert manifest == _manifest(d)
        structural = ("scale", "layer", "op", "kernel", "mode", "binary", "layout", "layout_file", "tables_file",
                      "grid", "block", "sha256", "batch", "dtype", "decision_scale", "residual", "tables", "params")
        for path, value in accepted:  # what the schema lets through changes nothing a loader relies on
            if (path[-1] in structural or path[0] in ("model", "target", "plan")) and path[:2] != ("plan", "config"):
                original = _manifest(d)
                for key in path:
                    original = original[key]
                assert type(value) is type(original) and value == original, (path, value)
        for path, value in accepted[::7]:  # what the schema accepts loads (the files are the listed ones)
            rt.SparvarModule(d, "cpu", _verified=_set(manifest, path, value))


# ---------------------------------------------------------------------------------------------- the digest
def test_a_manifest_edited_without_its_digest_is_refused(small, tmp_path, capsys):
    d = _copy(small, tmp_path)
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text.replace('"name": "h100"', '"name": "a100"'))
    message = _refused(d, "manifest.json was modified: its sha256")
    assert "manifest.sha256" in message
    assert main(["verify", str(d), "--gpu", "a100"]) == 1
    assert "manifest.json was modified" in capsys.readouterr().err


def test_a_retargeted_manifest_with_its_digest_recomputed_is_still_refused(small, tmp_path):
    """Who rewrites both can only write a manifest within the schema: an a100 target does not match the
    kernels' sm_90a records, and the records' sha256 are the listed cubins'."""
    d = _copy(small, tmp_path)
    manifest = _manifest(d)
    manifest["target"] = get_gpu("a100").to_dict()
    _rewrite(d, manifest)
    with pytest.raises(ModuleError, match=r"meta.arch: sm_90a is not the target's arch \(sm_80\)"):
        verify_module(d, gpu="a100")
    for k in manifest["kernels"].values():
        k["meta"]["arch"] = "sm_80"
    _rewrite(d, manifest)
    # Now within the schema; verify says what it was built for, and a GPU loader checks the target against the
    # device while the driver checks the cubin's own arch (sm_90a), which the manifest cannot change.
    assert verify_module(d, gpu="a100")["target"]["arch"] == "sm_80"


def test_a_relabel_between_identical_cards_is_what_the_digest_cannot_stop(small, tmp_path):
    """Documented limit (emit.manifest's docstring): h100 and h200 share arch and SM count, so a rewrite of
    name and sizes passes; the kernels run correctly, tuned for the other card."""
    d = _copy(small, tmp_path)
    manifest = _manifest(d)
    manifest["target"] = get_gpu("h200").to_dict()
    _rewrite(d, manifest)
    assert verify_module(d, gpu="h200")["target"]["name"] == "h200"
    with pytest.raises(ModuleError, match="built for h200, not h100"):
        verify_module(d, gpu="h100")


def test_verify_states_the_target_and_refuses_another_gpu(small, capsys):
    assert main(["verify", str(small)]) == 0
    assert "for h100" in capsys.readouterr().out
    assert main(["verify", str(small), "--gpu", "a100"]) == 1
    assert "module was built for h100, not a100" in capsys.readouterr().err
    assert main(["verify", str(small), "--gpu", "H100"]) == 0


@pytest.mark.parametrize("content,fragment", [
    (None, "missing manifest.sha256"),
    (b"", "manifest.sha256: must be one line '<sha256>  manifest.json'"),
    (b"0" * 64 + b"  manifest.json\n", "manifest.json was modified"),
    (b"0" * 64 + b"  other.json\n", "manifest.sha256: must be one line"),
    (b"X" * 10_000, "manifest.sha256 is 10000 bytes, more than the limit"),
])
def test_a_missing_or_malformed_digest_is_refused(small, tmp_path, content, fragment):
    d = _copy(small, tmp_path)
    (d / "manifest.sha256").unlink()
    if content is not None:
        (d / "manifest.sha256").write_bytes(content)
    _refused(d, fragment)


def test_an_old_module_without_a_digest_says_its_version(small, tmp_path):
    d = _copy(small, tmp_path)
    manifest = _manifest(d)
    manifest["format_version"] = 3
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "manifest.sha256").unlink()
    _refused(d, "module format version 3, this sparvar reads version 4; emit the module again")


@pytest.mark.parametrize("data,fragment", [
    (b"[" * 200_000, "nested deeper than 64"),
    (b"[" * 65 + b"]" * 65, "nested deeper than 64"),
    (b'{"format": 1' + b"0" * 400 + b"}", "a number of 401 characters"),
    (b'{"format": NaN}', "NaN is not a JSON number"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2", "not valid JSON"),
    (b"[]", "not a sparvar runtime module manifest"),
])
def test_a_hostile_manifest_text_is_one_error(small, tmp_path, data, fragment):
    d = _copy(small, tmp_path)
    (d / "manifest.json").write_bytes(data)
    (d / "manifest.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")
    _refused(d, fragment)


# ---------------------------------------------------------------------------------------------- the tree
def test_a_symlinked_file_is_refused_even_with_the_right_content(small, tmp_path):
    d = _copy(small, tmp_path)
    binary = _manifest(d)["kernels"]["scale7_triton_block_32x32"]["binary"]
    outside = tmp_path / "outside.cubin"
    shutil.copy(d / binary, outside)
    (d / binary).unlink()
    (d / binary).symlink_to(outside)
    _refused(d, f"{binary} in the module is a symlink")


def test_a_symlinked_folder_is_refused(small, tmp_path):
    d = _copy(small, tmp_path)
    shutil.move(d / "layouts", tmp_path / "layouts-elsewhere")
    (d / "layouts").symlink_to(tmp_path / "layouts-elsewhere")
    _refused(d, "layouts in the module is a symlink")


def test_a_fifo_under_a_symlinked_folder_is_refused(small, tmp_path):
    d = _copy(small, tmp_path)
    (tmp_path / "elsewhere").mkdir()
    os.mkfifo(tmp_path / "elsewhere" / "pipe")
    (d / "extra").symlink_to(tmp_path / "elsewhere")
    _refused(d, "extra in the module is a symlink")


def test_the_module_directory_and_its_manifest_must_not_be_symlinks(small, tmp_path):
    d = _copy(small, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(d)
    _refused(link, "the module directory is a symlink")
    shutil.move(d / "manifest.json", tmp_path / "manifest.json")
    (d / "manifest.json").symlink_to(tmp_path / "manifest.json")
    _refused(d, "manifest.json is a symlink")


@pytest.mark.parametrize("where", ["kernels/pipe", "README.txt"])
def test_a_fifo_is_refused_without_blocking(small, tmp_path, where):
    d = _copy(small, tmp_path)
    (d / where).unlink(missing_ok=True)
    os.mkfifo(d / where)
    _refused(d, f"{where} in the module is not a regular file (a FIFO, socket or device)")


def test_a_fifo_in_place_of_the_manifest_is_refused_without_blocking(small, tmp_path):
    d = _copy(small, tmp_path)
    (d / "manifest.json").unlink()
    os.mkfifo(d / "manifest.json")
    _refused(d, "manifest.json is not a regular file")


def test_unlisted_and_missing_files_are_refused(small, tmp_path):
    d = _copy(small, tmp_path)
    (d / "layouts" / "extra.npz").write_bytes(b"x")
    _refused(d, "file layouts/extra.npz is not listed in the manifest")
    d2 = _copy(small, tmp_path, "c2")
    manifest = _manifest(d2)
    del manifest["files"]["README.txt"]
    _rewrite(d2, manifest)  # README.txt is referenced by nothing: the schema holds, the tree does not
    _refused(d2, "file README.txt is not listed in the manifest")
    d3 = _copy(small, tmp_path, "c3")
    manifest = _manifest(d3)
    manifest["shared_files"] = {"kernels/x.cubin": "0" * 64}
    _rewrite(d3, manifest)
    _refused(d3, "is a member of a module set")


# ---------------------------------------------------------------------------------------------- arrays at load
def _write_npz(path: Path, arrays: dict) -> None:
    np.savez_compressed(path, **arrays)


def test_kernel_tables_out_of_the_layout_are_refused_at_load(small, tmp_path):
    """A consistent rewrite (file hash and manifest digest recomputed) of a table whose padding points past the
    layout: a kernel would read out of bounds, so the loader refuses it."""
    d = _copy(small, tmp_path)
    manifest = _manifest(d)
    k = manifest["kernels"]["scale7_triton_block_32x32"]
    with np.load(d / k["layout"]) as z:
        arrays = {n: z[n].copy() for n in z.files}
    arrays["table_kv_idx"][0, -1] = 10_000
    _write_npz(d / k["layout"], arrays)
    _rehash(d, manifest, k["layout"])
    _rewrite(d, manifest)
    verify_module(d)  # every field and hash is consistent
    with pytest.raises(ModuleError, match="tables kv_num/kv_idx are not those of the kernel's layout"):
        rt.load(d, device="cpu")
    arrays["table_kv_idx"] = arrays["table_kv_idx"].astype(np.int64)
    _write_npz(d / k["layout"], arrays)
    _rehash(d, manifest, k["layout"])
    _rewrite(d, manifest)
    with pytest.raises(ModuleError, match="array table_kv_idx is int64 .*, the manifest needs int32"):
        rt.load(d, device="cpu")


def test_an_npz_header_claiming_terabytes_is_refused_before_reading(small, tmp_path):
    d = _copy(small, tmp_path)
    manifest = _manifest(d)
    k = manifest["kernels"]["scale7_triton_block_32x32"]
    header = "{'descr': '<i4', 'fortran_order': False, 'shape': (1099511627776,), }"
    header += " " * (63 - len(header) % 64) + "\n"
    with zipfile.ZipFile(d / k["layout"], "w") as z:
        z.writestr("table_kv_num.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
    _rehash(d, manifest, k["layout"])
    _rewrite(d, manifest)
    with pytest.raises(ModuleError, match="table_kv_num"):
        rt.load(d, device="cpu")


def test_a_layout_file_swapped_for_another_listed_one_is_refused(small, tmp_path):
    d = _copy(small, tmp_path)
    manifest = _manifest(d)
    manifest["kernels"]["scale7_triton_block_32x32"]["layout_file"] = \
        manifest["kernels"]["scale8_triton_block_32x32"]["layout_file"]
    _rewrite(d, manifest)
    verify_module(d)
    with pytest.raises(ModuleError, match="kernel scale7_triton_block_32x32: layout_file is 169x424"):
        rt.load(d, device="cpu")


def test_cs4a_tables_out_of_range_are_refused_at_load(with_cs4a, tmp_path):
    d = _copy(with_cs4a, tmp_path)
    manifest = _manifest(d)
    entry = manifest["cs4a"]["scales"]["9"]
    with np.load(d / entry["tables_file"]) as z:
        arrays = {n: z[n].copy() for n in z.files}
    arrays["static_keys"][0, -1] = 10**6
    _write_npz(d / entry["tables_file"], arrays)
    _rehash(d, manifest, entry["tables_file"])
    _rewrite(d, manifest)
    verify_module(d)
    with pytest.raises(ModuleError, match="cs4a tables of scale 9 .*: static_keys holds an index outside 0..679"):
        rt.load(d, device="cpu")
    del arrays["static_len"]
    _write_npz(d / entry["tables_file"], arrays)
    _rehash(d, manifest, entry["tables_file"])
    _rewrite(d, manifest)
    with pytest.raises(ModuleError, match="has no array static_len"):
        rt.load(d, device="cpu")


def test_a_file_changed_after_verify_is_refused_by_load(small, tmp_path, monkeypatch):
    """The loader re-hashes the bytes it uses: a file swapped between verify and load is caught."""
    d = _copy(small, tmp_path)
    import sparvar_compiler.runtime.module as module

    real = module.verify_module

    def verify_then_swap(directory):
        manifest = real(directory)
        k = manifest["kernels"]["scale7_triton_block_32x32"]
        (Path(directory) / k["layout"]).write_bytes((Path(directory) / k["layout"]).read_bytes() + b"\0")
        return manifest

    monkeypatch.setattr(module, "verify_module", verify_then_swap)
    with pytest.raises(ModuleError, match="was modified"):
        rt.load(d, device="cpu")


def test_a_malformed_kernel_record_is_a_clear_error():
    """``CompiledKernel.from_meta`` (what a GPU loader builds kernels from) names the field, never KeyError."""
    meta = {"backend": "triton", "arch": "sm_90a", "entry": "k", "binary_format": "cubin",
            "params": [{"name": "q", "kind": "ptr", "nbytes": 0}], "grid": [1, 2, 1], "block": [128, 1, 1],
            "shared_bytes": 0, "resources": {}, "spec": {"batch": 2}, "config": {}, "batch": 2,
            "batch_grid": [1, 1], "batch_scalars": {}}
    assert CompiledKernel.from_meta(meta, b"\x7fELF").launch_grid(3) == (1, 3, 1)
    for key, value, fragment in [("grid", DELETE, "meta: has no 'grid'"), ("params", [{"name": "q"}], "params[0]"),
                                 ("grid", [1, 2], "meta.grid: must be a list of three"),
                                 ("batch_grid", [1, 3], "does not match grid"), ("spec", [], "meta.spec: must be"),
                                 ("batch", "2", "meta.batch: must be an integer"),
                                 ("sha256", "0" * 64, "does not match the recorded")]:
        bad = _set(meta, (key,), value)
        with pytest.raises(KernelMetaError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
            CompiledKernel.from_meta(bad, b"\x7fELF")
    with pytest.raises(KernelMetaError, match="meta: must be an object"):
        CompiledKernel.from_meta(None, b"")
    with pytest.raises(KernelMetaError, match="binary_b64"):
        CompiledKernel.from_json_dict({**meta, "binary_b64": "not base64!"})


# ---------------------------------------------------------------------------------------------- module sets
def _set_manifest(d: Path) -> dict:
    return json.loads((d / "moduleset.json").read_text())


def _set_refused(d: Path, fragment: str) -> None:
    with pytest.raises(ModuleError) as verify_error:
        verify_module_set(d)
    with pytest.raises(ModuleError) as load_error:
        rt.load(d, device="cpu")
    assert fragment in str(verify_error.value) and fragment in str(load_error.value), str(verify_error.value)


def test_the_emitted_set_verifies_and_loads(module_set):
    data = verify_module_set(module_set, gpu="h100")
    check_set_manifest(data)
    assert len(rt.load(module_set, device="cpu")) == 2
    with pytest.raises(ModuleError, match="built for h100, not a100"):
        verify_module_set(module_set, gpu="a100")


def test_a_tampered_member_manifest_is_refused(module_set, tmp_path):
    d = _copy(module_set, tmp_path)
    member = d / "256-1x1"
    text = (member / "manifest.json").read_text()
    (member / "manifest.json").write_text(text.replace('"softmax_scale": 1.0', '"softmax_scale": 2.0'))
    _set_refused(d, "manifest.json was modified")
    manifest = json.loads(text)
    manifest["softmax_scale"] = 2.0
    _rewrite(member, manifest)  # the member's digest recomputed: the set still records the old manifest
    _set_refused(d, "member 256-1x1: its manifest.json is not the one the set recorded")


def test_a_tampered_pool_file_is_refused(module_set, tmp_path):
    d = _copy(module_set, tmp_path)
    pooled = sorted((d / "shared").iterdir())[0]
    pooled.write_bytes(pooled.read_bytes() + b"\0")
    _set_refused(d, "was modified")
    pooled.unlink()
    pooled.symlink_to(tmp_path)
    _set_refused(d, "in the pool is a symlink")
    pooled.unlink()
    os.mkfifo(pooled)
    _set_refused(d, "in the pool is not a regular file")


def test_a_symlinked_pool_or_member_is_refused(module_set, tmp_path):
    d = _copy(module_set, tmp_path)
    shutil.move(d / "shared", tmp_path / "pool")
    (d / "shared").symlink_to(tmp_path / "pool")
    _set_refused(d, "shared must be a real directory")
    d2 = _copy(module_set, tmp_path, "c2")
    shutil.move(d2 / "256-4x3", tmp_path / "member")
    (d2 / "256-4x3").symlink_to(tmp_path / "member")
    _set_refused(d2, "256-4x3 must be a real directory")


def test_a_tampered_set_manifest_is_refused(module_set, tmp_path):
    d = _copy(module_set, tmp_path)
    data = _set_manifest(d)
    (d / "moduleset.json").write_text(json.dumps({**data, "batch": 4}))
    _set_refused(d, "moduleset.json was modified")
    for path, value, fragment in [
            (("members", 0, "name"), "../x", "members[0].name: must be a name"),
            (("members", 0, "name"), "shared", "members[0].name: 'shared' cannot name a member"),
            (("members", 1, "name"), "256-1x1", "members[1].name: member 256-1x1 is listed twice"),
            (("members",), [], "members: must list at least one member"),
            (("members", 0, "grids"), "x", "members[0].grids: must be a list"),
            (("members", 0, "manifest_sha256"), "0" * 64, "member 256-1x1: its manifest.json is not the one"),
            (("members", 0, "aspect"), "4:3", "member 256-1x1: its plan's schedule is not the one the set lists"),
            (("shared", "../x.cubin"), "0" * 64, "shared['../x.cubin']: is not a pool file name"),
            (("shared", "0" * 64 + ".cubin"), "1" * 64, "does not match the sha256 its name starts with"),
            (("target", "name"), "a100", "target.arch: 'sm_90' does not match a100's arch"),
            (("batch",), 4, "member 256-1x1: its batch is not the set's"),
            (("stats",), DELETE, "(top level): has no 'stats'"),
            (("format_version",), 0, "module set format version 0")]:
        bad = _set(data, path, value)
        _rewrite(d, bad, "moduleset")
        _set_refused(d, fragment)


def test_a_pool_file_no_one_lists_is_refused(module_set, tmp_path):
    d = _copy(module_set, tmp_path)
    (d / "shared" / ("0" * 64 + ".cubin")).write_bytes(b"x")
    _set_refused(d, "is not listed in moduleset.json")
