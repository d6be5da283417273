"""Command line: ``sparvar-compile``.

``sparvar-compile --model infinity-8b --gpu h100`` is the main job (``compile``); other stages are sub-commands
(``plan``, ``tune``, ``verify``, ``inspect``, ``db``, ``models``, ``gpus``, ``doctor``, ``fidelity``,
``calibrate``).

Output contract, every verb: results go to stdout; progress and notes go to stderr (a progress bar when stderr
is a terminal, plain lines otherwise). With ``--json`` stdout holds exactly one JSON document (no NaN or
Infinity: a missing or infinite number is ``null``). Exit status: 0 success; 1 a check failed (``verify`` or
``inspect`` of a bad module, a failed tuning worker); 2 a usage, input or environment error; 130 interrupted.

Errors are one line on stderr naming the input and the problem, never a traceback: flags are checked while
parsing (:mod:`sparvar_compiler.cli_args`), and :func:`main` maps what escapes a verb - our
:class:`~sparvar_compiler.errors.SparvarError`, and at the input and output boundaries OS errors, decode errors
(UTF-8, JSON, YAML, npz), database errors and ValueError/TypeError/KeyError/MemoryError/RecursionError - to
that line. ``SPARVAR_DEBUG=1`` re-raises instead, with the traceback (a bug must stay visible).

``SPARVAR_DB`` is the database URL of every verb taking ``--db`` (the flag wins), so that a PostgreSQL password
stays off the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .cli_args import (DB_ENV, OneLineParser, add_plan_args, block_sizes, check_database_env, database_location,
                       database_url, float_range, input_file, int_range, kernel_backends, mask_url,
                       mask_urls, module_directory, one_line, output_directory, output_file,
                       output_path_problem, plan_from_args)
from .errors import OutputPathError, PlanConfigError, SparvarError
from .limits import MAX_BATCH
from .planner import (csla_layout, format_summary, get_gpu, get_model, list_gpus, list_models, plan_summary)
from .planner.layout import check_block_size

COMMANDS = ("compile", "plan", "tune", "verify", "inspect", "db", "models", "gpus", "doctor", "fidelity",
            "calibrate")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEBUG_ENV = "SPARVAR_DEBUG"  # 1: an error that escapes a verb is re-raised with its traceback
DEBUG_HINT = f"(set {DEBUG_ENV}=1 for the traceback)"
DB_VERBS = ("compile", "tune", "db")  # the verbs that open $SPARVAR_DB
# Dependencies by import name, and how to install each: an extra of ours, or the package (a missing one is an
# environment problem reported in one line, not a traceback).
EXTRAS = {"matplotlib": "plot", "psycopg": "postgres", "psycopg2": "postgres", "tvm": "tvm", "tvm_ffi": "tvm"}
REQUIRED = {"sqlalchemy": "sqlalchemy", "optuna": "optuna", "jinja2": "jinja2", "yaml": "pyyaml",
            "triton": "triton", "torch": "torch", "numpy": "numpy", "tqdm": "tqdm", "alembic": "alembic"}

EPILOG = f"""\
Without a sub-command, runs 'compile': sparvar-compile --model infinity-8b --gpu h100

output:
  results go to stdout; progress and notes to stderr (a progress bar on a terminal). With --json, stdout holds
  exactly one JSON document.

environment:
  {DB_ENV}            your tuning database (URL or path) for every verb taking --db, in place of the cache
                        database: tune and db import/export use it, compile and db stats read it over the
                        shipped one. --db wins and is used alone. E.g. postgresql+psycopg://user:pw@host/tuning:
                        the password stays off the command line
  SPARVAR_CACHE_DIR     directory of the cache database tuning.sqlite (default $XDG_CACHE_HOME/sparvar, else
                        ~/.cache/sparvar)

exit status:
  0    success
  1    a check failed: verify/inspect of a bad module (ModuleError), a failed tuning worker
  2    usage, input or environment error (unknown model or GPU, bad flag, missing or malformed file, an
       output that cannot be written, an unreachable database, missing dependency): one line on stderr
  130  interrupted

  Errors are one line; SPARVAR_DEBUG=1 shows the traceback instead.

'sparvar-compile doctor' shows versions, the GPU, the database paths and what each feature is missing."""


# ---------------------------------------------------------------------------------------------- output
def note(text: str) -> None:
    """A note or progress line: stderr, never stdout (stdout holds results)."""
    print(text, file=sys.stderr, flush=True)


def _finite(value: Any) -> Any:
    """JSON-ready copy: NaN and infinities become None (strict JSON has neither), paths and tuples plain."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


def print_json(doc: Any) -> None:
    """The one JSON document a ``--json`` verb writes to stdout."""
    print(json.dumps(_finite(doc), indent=1, allow_nan=False, default=str), flush=True)


class Progress:
    """Progress lines for stderr.

    Not on a terminal: every line as it comes. On one: a tqdm bar driven by the counts in the lines -
    ``[i/n] ...`` (item ``i`` of ``n`` starts: the emitter's kernel compiles) and ``... trial i/n ...`` (trial
    ``i`` of ``n`` is done: the tuner) - with every other line printed above the bar.
    """

    _START = re.compile(r"^\s*\[(\d+)/(\d+)\]\s*")
    _DONE = re.compile(r"\btrial (\d+)/(\d+):?\s*")

    def __init__(self, stream=None, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                tty = False
        self._tqdm = None
        if tty:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm
            except ImportError:  # tqdm comes with optuna; without it, plain lines
                pass
        self._bar = None
        self._started = False  # the bar's current item has started and not yet finished

    @property
    def bar(self) -> bool:
        return self._tqdm is not None

    def __call__(self, line: str) -> None:
        if self._tqdm is None:
            print(line, file=self.stream, flush=True)
            return
        start, done = self._START.search(line), self._DONE.search(line)
        m = start or done
        if m is None:
            self._finish_item()
            self._write(line)
            return
        i, n = int(m.group(1)), int(m.group(2))
        position = i - 1 if start else i
        if self._bar is None or self._bar.total != n or position < self._bar.n:
            self.close()
            self._bar = self._tqdm(total=n, file=self.stream, dynamic_ncols=True, leave=True)
        what = (line[:m.start()] + " " + line[m.end():]).strip()
        self._bar.set_description_str(what[:60], refresh=False)
        self._bar.update(position - self._bar.n)
        self._started = bool(start)

    def _finish_item(self) -> None:
        if self._bar is not None and self._started:
            self._bar.update(1)
            self._started = False

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish and close the bar (if any); later lines start a new one."""
        self._finish_item()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- databases
def _open_db(url: str | None, readonly: bool = False):
    """The database a compile reads winners from, which ``db stats`` shows: ``--db URL`` alone, else
    :meth:`LayeredDatabase.open_default` - your database (``$SPARVAR_DB``, else the cache database) over the
    shipped one. ``readonly`` (no tuning will happen): nothing is created or written, so a read-only shipped or
    cache database serves; a ``--db`` SQLite file that does not exist is None (no winners)."""
    from .db import LayeredDatabase, TuningDatabase

    if url:
        if readonly:
            path = _sqlite_file(url)
            if path is not None and not path.exists():
                return None
        return TuningDatabase.open(url, readonly=readonly)
    return LayeredDatabase.open_default(readonly=readonly)


def _sqlite_file(url: str | os.PathLike) -> Path | None:
    """The file of a SQLite database path or ``sqlite:///`` URL; None for another database."""
    text = os.fspath(url)
    if "://" not in text:
        return Path(text).expanduser()
    if text.startswith("sqlite:///"):
        return Path(text[len("sqlite:///"):]).expanduser()
    return None


def _write_db_url(args: argparse.Namespace) -> str:
    """The database a verb that writes records uses: ``--db``, else ``$SPARVAR_DB``, else the cache database."""
    from .db import default_database_url

    return args.db or default_database_url()


def db_urls(db, url: str | None = None) -> list[str]:
    """The (password-masked) URLs of a database's layers, first match first; ``db`` None: the ``url`` named,
    which does not exist."""
    if db is None:
        return [f"{mask_url(url)} (not there: no winners)"]
    return [mask_url(layer.url) for layer in getattr(db, "layers", (db,))]


def _read_db_names(db, url: str | None, readonly: bool) -> list[str]:
    """:func:`db_urls` of the database a compile reads, naming a user database that a read-only open left out
    because it does not exist (so that a mistyped ``$SPARVAR_DB`` shows)."""
    names = db_urls(db, url)
    if db is not None and url is None and readonly:
        from .db import default_database_url

        user = default_database_url()
        path = _sqlite_file(user)
        if path is not None and not path.exists():
            names.insert(0, f"{mask_url(user)} (not there: no winners)")
    return names


def _local_gpu_matches(gpu) -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        props = torch.cuda.get_device_properties(0)
        return f"sm_{props.major}{props.minor}" == gpu.arch and props.multi_processor_count == gpu.sm_count
    except Exception:  # noqa: BLE001 - no usable GPU means "not present"
        return False


# ---------------------------------------------------------------------------------------------- plan
def _cmd_plan(args: argparse.Namespace) -> int:
    bm = check_block_size(128 if args.block_m is None else args.block_m, "--block-m")
    bn = check_block_size(128 if args.block_n is None else args.block_n, "--block-n")
    plan = plan_from_args(args)
    summary = plan_summary(plan, bm, bn)
    written: dict[str, list[str]] = {}
    if args.export_layouts is not None:
        written["layouts"] = [str(p) for p in export_layouts(plan, args.export_layouts, bm, bn)]
        note(f"wrote {len(written['layouts'])} layout files (npy, FlexAttention BlockMask, BSR) to "
             f"{args.export_layouts}")
    if args.plot is not None:
        written["plots"] = [str(p) for p in _plot_layouts(plan, args.plot, args.block_m, args.block_n)]
        for p in written["plots"]:
            note(f"wrote {p}")
    if args.json:
        print_json({"plan": plan.to_dict(), **summary, "files": written})
    else:
        print(format_summary(summary))
    return EXIT_OK


EXPORT_README = """\
Block-sparse layouts of {model} {resolution} px {aspect} (h:w), one file set per query scale with CSLA layers.
A layout is one [q_blocks, kv_blocks] pattern shared by every batch element and head; queries are the scale's
own tokens, keys the whole KV cache up to and including that scale (kv_len in each file). Active blocks are
computed whole (SparVAR's block level){exact}.

scale<i>.npy            bool [q_blocks, kv_blocks]: the active blocks.
scale<i>.blockmask.npz  PyTorch FlexAttention BlockMask tensors, B = H = 1 (flex broadcasts):
                        kv_num_blocks, kv_indices (partial blocks), full_kv_num_blocks, full_kv_indices,
                        BLOCK_SIZE (block_m, block_n), seq_lengths (q_len, kv_len), active (as
                        scale<i>.npy){token_mask}.
scale<i>.bsr.npz        Block CSR, FlashInfer BlockSparseAttentionWrapper.plan arguments: indptr, indices,
                        M, N (q_len, kv_len), R, C (block_m, block_n), block_shape, shape{mask}.

FlexAttention (torch >= 2.5):

    import numpy as np, torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    z = np.load("scale12.blockmask.npz"); t = lambda k: torch.from_numpy(z[k]).cuda()
    bm, bn = z["BLOCK_SIZE"].tolist(); active = t("active"); {mask_mod}
    mask = BlockMask.from_kv_blocks(t("kv_num_blocks"), t("kv_indices"), t("full_kv_num_blocks"),
        t("full_kv_indices"), BLOCK_SIZE=(bm, bn), seq_lengths=tuple(z["seq_lengths"].tolist()), mask_mod=mask_mod)
    out = torch.compile(flex_attention)(q, k, v, block_mask=mask, scale=1.0)  # q,k,v [B, H, len, D]

The mask_mod must agree with the tables: eager (uncompiled) flex evaluates it everywhere and ignores them.
With blocks smaller than flex's tile (128 on Hopper) pass kernel_options={{"BLOCK_M": bm, "BLOCK_N": bn}}.

FlashInfer:

    import flashinfer, numpy as np, torch
    z = np.load("scale12.bsr.npz"); t = lambda k: torch.from_numpy(z[k]).cuda()
    w = flashinfer.BlockSparseAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(t("indptr"), t("indices"), int(z["M"]), int(z["N"]), int(z["R"]), int(z["C"]),
           num_qo_heads=H, num_kv_heads=H, head_dim=128, sm_scale=1.0, q_data_type=torch.bfloat16{mask_arg})
    out = w.run(q, k, v)  # q [M, H, D], k and v [N, H, D]: one batch element

In Python, sparvar_compiler.codegen.interop converts both ways (to_block_mask/from_block_mask, to_bsr/from_bsr).
Softmax scale: Infinity uses 1.0 (q, k normalised, q scaled per head); VAR uses 1/sqrt(head_dim).
"""


def export_layouts(plan, directory: Path, block_m: int, block_n: int) -> list[Path]:
    """Write every CSLA scale's layout of ``plan`` into ``directory`` as ``scale<i>.npy`` (active blocks),
    ``scale<i>.blockmask.npz`` (FlexAttention ``BlockMask`` tensors) and ``scale<i>.bsr.npz`` (BSR,
    FlashInfer's ``plan`` arguments), plus ``README.txt`` saying how to load them. Returns the paths written.

    Block level (every active block whole) unless the plan is ``token_exact``: then the BlockMask keeps partial
    blocks apart and the BSR carries a ``mask [nnz, R, C]`` of every listed block.
    """
    from .codegen.interop import to_block_mask, to_bsr

    directory.mkdir(parents=True, exist_ok=True)
    exact = bool(plan.config.token_exact)
    written: list[Path] = []
    for s in plan.scales:
        if not s.has_csla:
            continue
        layout = csla_layout(plan, s.index, block_m, block_n)
        target = directory / f"scale{s.index}.npy"
        np.save(target, layout.active(), allow_pickle=False)
        written.append(target)
        exact_here = exact and layout.has_token_masks
        mask = to_block_mask(layout, token_exact=exact_here)
        tables = {"kv_num_blocks": mask.kv_num_blocks.numpy(), "kv_indices": mask.kv_indices.numpy(),
                  "full_kv_num_blocks": mask.full_kv_num_blocks.numpy(),
                  "full_kv_indices": mask.full_kv_indices.numpy(),
                  "BLOCK_SIZE": np.array([layout.block_m, layout.block_n], dtype=np.int64),
                  "seq_lengths": np.array([layout.q_len, layout.kv_len], dtype=np.int64), "active": layout.active()}
        if exact_here:  # flex's partial blocks need a mask_mod: it reads this [q_len, kv_len] token mask
            tables["token_mask"] = layout.to_token_mask(exact=True)
        target = directory / f"scale{s.index}.blockmask.npz"
        np.savez_compressed(target, **tables)
        written.append(target)
        bsr = to_bsr(layout, with_mask=exact and layout.has_token_masks)
        arrays = {"indptr": bsr.indptr, "indices": bsr.indices, "M": np.int64(bsr.M), "N": np.int64(bsr.N),
                  "R": np.int64(bsr.R), "C": np.int64(bsr.C), "block_shape": np.array([bsr.R, bsr.C], np.int64),
                  "shape": np.array([bsr.M, bsr.N], np.int64)}
        if bsr.mask is not None:
            arrays["mask"] = bsr.mask
        target = directory / f"scale{s.index}.bsr.npz"
        np.savez_compressed(target, **arrays)
        written.append(target)
    readme = directory / "README.txt"
    readme.write_text(EXPORT_README.format(
        model=plan.model, resolution=plan.resolution, aspect=plan.aspect,
        exact=("; this plan is token exact: partial blocks keep only their token mask (blockmask.npz: "
               "token_mask [q_len, kv_len], read by the mask_mod; bsr.npz: mask)") if exact else "",
        token_mask=", token_mask (token exact)" if exact else "",
        mask=", mask [nnz, R, C] (token exact)" if exact else "",
        mask_mod="tm = t(\"token_mask\"); mask_mod = lambda b, h, q, kv: tm[q, kv]" if exact else
                 "mask_mod = lambda b, h, q, kv: active[q // bm, kv // bn]",
        mask_arg=", mask=t(\"mask\")" if exact else ""))
    written.append(readme)
    return written


def _plot_layouts(plan, directory: Path, block_m: int | None, block_n: int | None) -> list[Path]:
    """``scale<i>.png`` per CSLA scale at the module's block size (the emitter's default block unless
    ``--block-m``/``--block-n`` say otherwise), key-scale boundaries drawn."""
    from .emit.emitter import DEFAULT_BLOCK
    from .planner.csla import key_scale_spans

    bm = check_block_size(DEFAULT_BLOCK if block_m is None else block_m, "--block-m")
    bn = check_block_size(DEFAULT_BLOCK if block_n is None else block_n, "--block-n")
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for s in plan.scales:
        if not s.has_csla:
            continue
        layout = csla_layout(plan, s.index, bm, bn)
        title = (f"{plan.model} {plan.resolution} px {plan.aspect}: query scale {s.index} ({s.h}x{s.w}, "
                 f"{s.tokens} tokens) x {s.kv_len} keys\n{bm}x{bn} blocks, {100 * layout.sparsity():.1f}% "
                 "skipped")
        out.append(layout.plot(directory / f"scale{s.index}.png", title=title,
                               key_scales=key_scale_spans(plan, s.index)))
    return out


# ---------------------------------------------------------------------------------------------- tuning
def _worker_slot(text: str) -> tuple[int, int]:
    """``I/K`` (0 <= I < K) as a tuple, for ``--worker-slot``."""
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/K such as 0/2, got {text!r}") from None
    if not 0 <= i < k:
        raise argparse.ArgumentTypeError(f"need 0 <= I < K, got {text!r}")
    return i, k


def tune_rows(results) -> list[dict[str, Any]]:
    """The tune winners table as data: one row per workload, in the plan's order."""
    rows = []
    for scale, r in results:
        s = r.spec
        rows.append({
            "scale": scale, "backend": s.backend, "kind": s.kind, "block_m": s.block_m, "block_n": s.block_n,
            "q_len": getattr(s, "q_len", None), "kv_len": getattr(s, "kv_len", None),
            "default_ms": r.default_ms, "best_ms": r.best_ms, "gain": r.gain,
            "measured": r.measured, "reused": r.reused, "invalid": dict(r.invalid), "seconds": r.seconds,
            "config": r.best_config.to_dict() if r.best_config else None,
            "default_config": r.default_config.to_dict(), "study": getattr(r, "study", None),
            "spec": s.to_dict(),
        })
    return rows


def format_tune_table(rows: list[dict[str, Any]]) -> str:
    ms = lambda v: f"{v:.4f}" if v is not None and math.isfinite(v) else "-"  # noqa: E731
    lines = [f"{'scale':>5} {'kernel':<22} {'default ms':>10} {'tuned ms':>9} {'gain':>6}  measured/reused  config"]
    for r in rows:
        kname = f"{r['backend']}/{r['kind']} {r['block_m']}x{r['block_n']}"
        gain = f"{r['gain']:.2f}" if r["gain"] is not None and math.isfinite(r["gain"]) else "-"
        lines.append(f"{r['scale']:>5} {kname:<22} {ms(r['default_ms']):>10} {ms(r['best_ms']):>9} {gain:>6}  "
                     f"{r['measured']:>4}/{r['reused']:<4}        {r['config']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- modules
def module_doc(manifest: dict[str, Any]) -> dict[str, Any]:
    """A module's kernels as data: ``kernels`` (per CSLA kernel: scale, backend, kind, block, sparsity, tuned,
    expected ms per call, config, calls per image), ``cs4a`` (None, or its mode, decision scale, bound layer,
    mapping, residual, helper kernels and per-scale ``kernels``), ``dispatch`` (calls per image by op),
    ``tuned``/``cs4a_tuned`` and ``expected_ms`` (kernel time per image, from the tuned timings)."""
    calls: dict[tuple[int, str | None], int] = {}
    dispatch: dict[str, int] = {}
    for row in manifest["dispatch"]:
        dispatch[row["op"]] = dispatch.get(row["op"], 0) + 1
        key = (row["scale"], row.get("kernel") if row["op"] == "kernel" else row["op"])
        calls[key] = calls.get(key, 0) + 1
    kernels = []
    for name, k in sorted(manifest["kernels"].items(), key=lambda kv: kv[1]["scale"]):
        spec = k.get("spec", {})
        kernels.append({"name": name, "scale": k["scale"], "backend": spec.get("backend"),
                        "kind": spec.get("kind"), "block_m": spec.get("block_m"), "block_n": spec.get("block_n"),
                        "sparsity": k["sparsity"], "tuned": k["tuned"], "expected_ms": k["expected_ms"],
                        "config": k["config"], "source": k.get("source"),
                        "calls_per_image": calls.get((k["scale"], name), 0)})
    cs4a = manifest.get("cs4a")
    cs4a_doc = None
    if cs4a:
        rows = []
        for scale, k in sorted(cs4a["scales"].items(), key=lambda kv: int(kv[0])):
            n = calls.get((int(scale), "cs4a"), 0) + calls.get((int(scale), "cs4a_decision"), 0)
            rows.append({"name": k["name"], "scale": int(scale), "kind": k["spec"].get("kind"),
                         "capacity": k["spec"].get("capacity"), "tuned": k["tuned"],
                         "expected_ms": k["expected_ms"], "config": k["config"], "source": k.get("source"),
                         "calls_per_image": n})
        cs4a_doc = {"mode": cs4a["mode"], "decision_scale": cs4a["decision_scale"],
                    "bound_layer": cs4a["bound_layer"], "mapping": cs4a["mapping"], "residual": cs4a["residual"],
                    "stats_kernel": cs4a["stats"]["name"], "topk_kernel": cs4a.get("topk", {}).get("name"),
                    "kernels": rows}
    timed = kernels + (cs4a_doc["kernels"] if cs4a_doc else [])
    known = [k for k in timed if k["expected_ms"] is not None and k["calls_per_image"]]
    per_image = sum(k["expected_ms"] * k["calls_per_image"] for k in known)
    return {
        "kernels": kernels, "cs4a": cs4a_doc, "dispatch": dispatch,
        "tuned": bool(manifest["tuned"]), "cs4a_tuned": manifest.get("cs4a_tuned"),
        "expected_ms": {"kernels_per_image": per_image if known else None,
                        "complete": len(known) == len([k for k in timed if k["calls_per_image"]])},
    }


def format_module_table(doc: dict[str, Any]) -> str:
    ms = lambda v: f"{v:.4f}" if v else "-"  # noqa: E731
    lines = [f"{'scale':>5} {'kernel':<32} {'sparsity':>8} {'tuned':>5} {'expected ms':>11}  config"]
    for k in doc["kernels"]:
        lines.append(f"{k['scale']:>5} {k['name']:<32} {100 * k['sparsity']:7.1f}% {str(k['tuned']).lower():>5} "
                     f"{ms(k['expected_ms']):>11}  {k['config']}")
    cs4a = doc["cs4a"]
    if cs4a:
        for k in cs4a["kernels"]:
            what = f"cs4a {cs4a['mode']}, capacity {k['capacity']}"
            lines.append(f"{k['scale']:>5} {k['name']:<32} {'dynamic':>8} {str(k['tuned']).lower():>5} "
                         f"{ms(k['expected_ms']):>11}  {k['config']}  ({what})")
        helpers = ", ".join(n for n in (cs4a["stats_kernel"], cs4a["topk_kernel"]) if n)
        lines.append(f"cs4a: decision scale {cs4a['decision_scale']}, layers below {cs4a['bound_layer']}, "
                     f"{cs4a['mapping']} key mapping, residual {'on' if cs4a['residual'] else 'off'}; statistics "
                     f"and selection kernels {helpers}")
    tuned = doc["tuned"] and doc["cs4a_tuned"] is not False
    lines.append(f"dispatch: {', '.join(f'{v} {k}' for k, v in sorted(doc['dispatch'].items()))} calls per image"
                 + ("" if tuned else "; UNTUNED kernels use documented default configs"))
    exp = doc["expected_ms"]
    if exp["kernels_per_image"] is not None:
        lines.append(f"expected kernel time per image: {exp['kernels_per_image']:.2f} ms"
                     + ("" if exp["complete"] else " (tuned kernels only)"))
    return "\n".join(lines)


def _module_dir(directory: Path) -> Path:
    if not directory.exists():
        raise PlanConfigError(f"{directory} does not exist")
    return directory


# ---------------------------------------------------------------------------------------------- verbs
def _aspects(args: argparse.Namespace) -> list[str] | None:
    """``--aspect all`` (every aspect ratio of the model at the resolution) or a comma-separated list: the
    members of a module set; None for one module."""
    text = args.aspect
    if text is None or (text != "all" and "," not in text):
        return None
    model = get_model(args.model)
    if text == "all":
        resolution = plan_from_args(argparse.Namespace(**{**vars(args), "aspect": None})).resolution
        return list(model.aspects(resolution))
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise PlanConfigError(f"--aspect {text!r} names no aspect ratio")
    return names


def _check_module_output(out: Path, force: bool) -> None:
    """Refuse, before anything is tuned or compiled, an output the emitter would refuse after (the default
    ``out/...`` path too): :func:`~sparvar_compiler.emit.output.check_output` (a compiler never deletes what it
    did not write; ``force`` replaces a directory that is not a module)."""
    from .emit.output import check_output

    check_output(out, force)


def _compile_set(args: argparse.Namespace, aspects: list[str]) -> int:
    """``compile --aspect all|A,B,...``: one module set, a member per aspect ratio (kernels pooled)."""
    import time

    from .db import collect_environment
    from .emit.moduleset import emit_module_set
    from .tuner.plan import tune_plan

    gpu = get_gpu(args.gpu)
    batch = args.batch
    plans = [plan_from_args(argparse.Namespace(**{**vars(args), "aspect": a})) for a in aspects]
    backends, blocks = args.backend, args.block_sizes
    p0 = plans[0]
    out = args.output or Path("out") / f"{p0.model}-{p0.resolution}-set{len(plans)}-{gpu.name}"
    _check_module_output(out, args.force)
    present = _local_gpu_matches(gpu)
    if args.tune == "always" and not present:
        raise PlanConfigError(f"--tune always needs a local {gpu.name}; none is present")
    tuning_here = args.tune == "always" or (args.tune == "auto" and present)
    db = _open_db(args.db, readonly=not tuning_here)
    databases = _read_db_names(db, args.db, readonly=not tuning_here)
    note(f"target: {gpu.name} ({gpu.arch}, {gpu.sm_count} SMs); {len(plans)} aspect ratios; GPU present here: "
         f"{'yes' if present else 'no'}; database: {' over '.join(databases)}")
    t0 = time.perf_counter()
    tuning = []
    with Progress() as progress:
        if tuning_here:
            for plan in plans:
                tuning += tune_rows(tune_plan(plan, gpu, db, backends, blocks, args.trials, args.budget_s,
                                              only_missing=args.tune == "auto", batch=batch, progress=progress))
            progress.close()
        manifest = emit_module_set(get_model(args.model), p0.resolution, [p.aspect for p in plans], gpu, out,
                                   config=p0.config, db=db, backends=backends, block_sizes=blocks, batch=batch,
                                   environment=collect_environment(probe_gpu=False), progress=progress,
                                   force=args.force)
    seconds = time.perf_counter() - t0
    doc = {"module_set": str(out), "target": gpu.to_dict(), "gpu_present": present, "database": databases,
           "tuning": tuning or None, "seconds": round(seconds, 1), "batch": batch, "stats": manifest["stats"],
           "members": [{"name": m["name"], "aspect": m["aspect"], "resolution": m["resolution"],
                        "last_grid": m["grids"][-1]} for m in manifest["members"]]}
    if args.json:
        print_json(doc)
        return EXIT_OK
    st = manifest["stats"]
    print(f"module set: {out}  ({len(doc['members'])} members: "
          f"{', '.join(m['aspect'] for m in doc['members'])})")
    print(f"kernels: {st['kernels']} ({st['distinct_kernels']} distinct, pooled by content); size "
          f"{st['bytes'] / 1e6:.1f} MB; compiled in {seconds:.1f} s")
    print(f"load with sparvar_compiler.runtime.load('{out}') (a ModuleSet: it picks the member by the image's "
          f"grids); check with: sparvar-compile verify {out}")
    return EXIT_OK


def _cmd_compile(args: argparse.Namespace) -> int:
    from .db import collect_environment
    from .emit.emitter import emit_module
    from .tuner.plan import tune_plan

    aspects = _aspects(args)
    if aspects is not None:
        return _compile_set(args, aspects)
    gpu = get_gpu(args.gpu)
    batch = args.batch
    plan = plan_from_args(args)
    backends, blocks = args.backend, args.block_sizes
    out = args.output or Path("out") / f"{plan.model}-{plan.resolution}-{plan.aspect.replace(':', 'x')}-{gpu.name}"
    _check_module_output(out, args.force)
    present = _local_gpu_matches(gpu)
    if args.tune == "always" and not present:
        raise PlanConfigError(f"--tune always needs a local {gpu.name}; none is present")
    tuning_here = args.tune == "always" or (args.tune == "auto" and present)
    db = _open_db(args.db, readonly=not tuning_here)
    databases = _read_db_names(db, args.db, readonly=not tuning_here)
    note(f"target: {gpu.name} ({gpu.arch}, {gpu.sm_count} SMs); GPU present here: {'yes' if present else 'no'}; "
         f"database: {' over '.join(databases)}")
    tuning = None
    with Progress() as progress:
        if tuning_here:
            tuning = tune_rows(tune_plan(plan, gpu, db, backends, blocks, args.trials, args.budget_s,
                                         only_missing=args.tune == "auto", batch=batch, progress=progress))
            progress.close()
            if not tuning:
                note("every workload has a database winner for this GPU: nothing to tune")
        env = collect_environment(probe_gpu=False)
        import warnings

        from .db.environment import SoftMismatchWarning

        with warnings.catch_warnings(record=True) as caught:
            # One line for all records measured under other patch versions, not one warning per kernel.
            warnings.simplefilter("always", SoftMismatchWarning)
            manifest = emit_module(plan, gpu, out, db=db, backends=backends, block_sizes=blocks, environment=env,
                                   batch=batch, progress=progress, force=args.force)
    soft = [w for w in caught if issubclass(w.category, SoftMismatchWarning)]
    for w in caught:
        if not issubclass(w.category, SoftMismatchWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if soft:
        detail = str(soft[0].message).split(" although ", 1)[-1]
        note(f"note: {len(soft)} tuning record(s) were measured under other patch versions (e.g. {detail}); "
             "they are used, as soft mismatches are")
    doc = module_doc(manifest)
    summary = plan_summary(plan, 128, 128)
    if args.json:
        print_json({"module": str(out), "target": gpu.to_dict(), "gpu_present": present,
                    "database": databases, "tuning": tuning, **doc, "plan": summary})
        return EXIT_OK
    if tuning:
        print(format_tune_table(tuning) + "\n")
    print(format_summary(summary) + "\n")
    print(format_module_table(doc))
    print(f"\nmodule: {out}  (load with sparvar_compiler.runtime.load('{out}'); "
          f"check with: sparvar-compile verify {out})")
    return EXIT_OK


def _built_for(target: Any) -> str:
    """``h100 (sm_90, 132 SMs)``: the GPU a module's manifest says it was built for."""
    if not isinstance(target, dict):
        return "an unknown GPU"
    return f"{target.get('name')} ({target.get('arch')}, {target.get('sm_count')} SMs)"


def _verify_failed(args: argparse.Namespace, directory: Path, error: str, target: Any = None) -> int:
    if args.json:
        print_json({"ok": False, "directory": str(directory), "error": error,
                    "target": target.get("name") if isinstance(target, dict) else None})
    note(f"sparvar-compile: verify failed: {one_line(error)}")
    return EXIT_FAILED


def _cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 and one ``ok`` line naming the GPU the module was built for; exit 1 for a bad module or one built
    for another GPU than ``--gpu``."""
    from .emit.manifest import SET_MANIFEST, ModuleError, verify_module

    directory = _module_dir(args.directory)
    gpu = get_gpu(args.gpu).name if args.gpu else None  # an unknown name is a usage error (2), before any check
    if (directory / SET_MANIFEST).is_file():
        return _verify_set(args, directory, gpu)
    try:
        m = verify_module(directory, gpu=gpu)
    except ModuleError as e:
        return _verify_failed(args, directory, str(e))
    target = m["target"]
    if gpu is not None and target.get("name") != gpu:  # the library checks too; a mismatch must never pass
        return _verify_failed(args, directory, f"module was built for {_built_for(target)}, not {gpu}", target)
    doc = {"ok": True, "directory": str(directory), "model": m["model"]["name"], "target": target["name"],
           "arch": target["arch"], "sm_count": target.get("sm_count"), "kernels": len(m["kernels"]),
           "files": len(m["files"]), "tuned": bool(m["tuned"]), "sparvar_version": m.get("sparvar_version")}
    if args.json:
        print_json(doc)
    else:
        print(f"ok: {directory}: {doc['model']} built for {_built_for(target)}, {doc['kernels']} kernels, "
              f"{doc['files']} files verified")
    return EXIT_OK


def _verify_set(args: argparse.Namespace, directory: Path, gpu: str | None) -> int:
    from .emit.manifest import ModuleError
    from .emit.moduleset import verify_module_set

    try:
        m = verify_module_set(directory, gpu=gpu)
    except ModuleError as e:
        return _verify_failed(args, directory, str(e))
    target = m["target"]
    if gpu is not None and target.get("name") != gpu:
        return _verify_failed(args, directory, f"module set was built for {_built_for(target)}, not {gpu}", target)
    doc = {"ok": True, "directory": str(directory), "model": m["model"]["name"], "target": target["name"],
           "arch": target["arch"], "sm_count": target.get("sm_count"), "members": [x["name"] for x in m["members"]],
           "kernels": m["stats"]["kernels"], "distinct_kernels": m["stats"]["distinct_kernels"],
           "files": len(m["shared"]), "sparvar_version": m.get("sparvar_version")}
    if args.json:
        print_json(doc)
    else:
        print(f"ok: {directory}: module set of {doc['model']} built for {_built_for(target)}, "
              f"{len(doc['members'])} members, {doc['kernels']} kernels ({doc['distinct_kernels']} distinct) "
              "verified")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .emit.manifest import ModuleError, verify_module

    directory = _module_dir(args.directory)
    try:
        m = verify_module(directory)
    except ModuleError as e:
        note(f"sparvar-compile: inspect: the module is bad: {one_line(e)}")
        return EXIT_FAILED
    p = m["plan"]
    doc = module_doc(m)
    plot = None
    if args.plot is not None:
        from .emit.plots import plot_dispatch

        plot = plot_dispatch(m, args.plot) or args.plot
        note(f"wrote {plot}")
    if args.json:
        print_json({"directory": str(directory), "model": m["model"], "resolution": p["resolution"],
                    "aspect": p["aspect"], "target": m["target"], "batch": m["batch"], "dtype": m["dtype"],
                    "softmax_scale": m["softmax_scale"], "sparvar_version": m.get("sparvar_version"),
                    "plan": p, **doc, "plot": str(plot) if plot is not None else None})
        return EXIT_OK
    print(f"{m['model']['name']} {p['resolution']} px {p['aspect']} for {m['target']['name']} "
          f"({m['target']['arch']}, {m['target']['sm_count']} SMs); batch {m['batch']}, {m['dtype']}, softmax "
          f"scale {m['softmax_scale']}; built with sparvar {m['sparvar_version']}\n")
    print(format_module_table(doc))
    return EXIT_OK


def _cmd_tune(args: argparse.Namespace) -> int:
    gpu = get_gpu(args.gpu)
    plan = plan_from_args(args)
    backends, blocks = args.backend, args.block_sizes
    if args.runner == "bundle":
        from .tuner.bundle import build_bundle
        from .tuner.plan import plan_tasks

        if not args.bundle:
            raise PlanConfigError("--runner bundle needs --bundle DIR")
        tasks = plan_tasks(plan, backends, blocks, args.batch)
        # The studies go where the results will be ingested, when that is named (else the replay makes them).
        with Progress() as progress:
            path = build_bundle(tasks, gpu, args.bundle, max_candidates=args.trials, progress=progress,
                                db=database_url(args))
        steps = [f"python -m sparvar_compiler.tuner.bundle measure {args.bundle} --out results.json",
                 f"sparvar-compile tune --model {args.model} --gpu {gpu.name} --runner replay --replay results.json"]
        if args.json:
            print_json({"bundle": str(path), "workloads": len(tasks), "target": gpu.to_dict(), "next": steps})
        else:
            print(f"wrote {path}; on the GPU host run:\n  {steps[0]}\nthen ingest here with:\n  {steps[1]}")
        return EXIT_OK
    from .db import TuningDatabase
    from .tuner.plan import tune_plan

    url = database_url(args)
    if args.workers > 1:
        if not url:
            raise PlanConfigError(f"--workers needs --db (or {DB_ENV}): a database every worker opens (a SQLite "
                                  "file on one host, PostgreSQL for several)")
        code = _run_tune_workers(args, url)
        if code:
            return code
        # Every trial is in the database now: the parent's pass below measures nothing (a replay runner with no
        # records) and prints the winners table from what the workers recorded.
        from .tuner.runners import ReplayRunner

        db = TuningDatabase.open(url)
        rows = tune_rows(tune_plan(plan, gpu, db, backends, blocks, args.trials, args.budget_s, "parent",
                                   ReplayRunner({}), mode="exhaustive", slot=(0, 1), batch=args.batch,
                                   progress=lambda _: None))
        return _print_tune(args, gpu, db.url, rows)
    runner = None
    if args.runner == "replay":
        from .tuner.runners import ReplayRunner

        if not args.replay:
            raise PlanConfigError("--runner replay needs --replay FILE (results of a measured bundle)")
        runner = _replay_runner(args.replay, gpu)
    elif not _local_gpu_matches(gpu):
        raise PlanConfigError(f"tuning needs a local {gpu.name} ({gpu.arch}, {gpu.sm_count} SMs); use "
                              "--runner bundle to build here and measure there")
    url = _write_db_url(args)
    db = TuningDatabase.open(url)
    note(f"tuning {plan.model} for {gpu.name} into {mask_url(db.url)}")
    with Progress() as progress:
        results = tune_plan(plan, gpu, db, backends, blocks, args.trials, args.budget_s, args.worker, runner,
                            mode="exhaustive" if runner is not None else "tpe", slot=args.worker_slot,
                            batch=args.batch, progress=progress)
    return _print_tune(args, gpu, db.url, tune_rows(results))


def _replay_runner(path: Path, gpu):
    """The replay runner of a measured bundle's results file (``--replay``); a file that is not one is an input
    error naming it."""
    from .db.bounded_json import JsonInputError, read_json
    from .tuner.runners import ReplayRunner

    bad = f"--replay {path} is not a results file of a measured bundle"
    try:
        data = read_json(path, what="a results file")  # bounded: size, depth, number lengths
    except JsonInputError as e:
        raise PlanConfigError(f"--replay {e}") from None
    target = data.get("target") if isinstance(data, dict) else None
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(target, (dict, type(None))) or not isinstance(records, list):
        raise PlanConfigError(f"{bad}: it needs a 'records' list (and a 'target' object)")
    measured_on = (target or {}).get("name", gpu.name)
    if measured_on != gpu.name:
        raise PlanConfigError(f"{path} was measured on {measured_on}, not {gpu.name}")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("spec"), dict) and isinstance(r.get("config"), dict)
                and isinstance(r.get("measurement"), dict)):
            raise PlanConfigError(f"{bad}: record {i} needs 'spec', 'config' and 'measurement' objects")
    try:
        return ReplayRunner.from_records(records)
    except SparvarError as e:
        raise PlanConfigError(f"{bad}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise PlanConfigError(f"{bad}: {type(e).__name__}: {one_line(e, 200)}") from None


def _print_tune(args: argparse.Namespace, gpu, url: str, rows: list[dict[str, Any]]) -> int:
    if args.json:
        print_json({"target": gpu.to_dict(), "database": mask_url(url), "runner": args.runner,
                    "worker": args.worker, "workers": args.workers, "results": rows})
    else:
        print(format_tune_table(rows))
    return EXIT_OK


def _run_tune_workers(args: argparse.Namespace, url: str) -> int:
    """Run ``args.workers`` copies of this tune command as processes sharing the database ``url`` (and so its
    Optuna studies: the budget counts every worker's trials, and no config is measured twice). With the local
    runner worker ``i`` sees GPU ``i`` (modulo the GPUs visible here). Their output is progress: it is streamed
    to stderr with a ``[wI]`` prefix. Returns the first non-zero exit status, else 0."""
    import subprocess
    import threading

    gpus = 1
    if args.runner == "local":
        try:
            import torch

            gpus = max(1, torch.cuda.device_count())
        except ImportError:
            pass
        if args.workers > gpus:
            note(f"warning: {args.workers} workers share {gpus} GPU(s): their timings disturb each other")
    base = list(args.argv)
    for flag in ("--workers", "--db"):  # "--flag VALUE" as two tokens
        while flag in base:
            i = base.index(flag)
            del base[i:i + 2]
    base = [a for a in base if not a.startswith(("--workers=", "--db=")) and a != "--json"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(g) for g in range(gpus)]
    root = str(Path(__file__).resolve().parents[1])
    procs = []
    for i in range(args.workers):
        env = dict(os.environ)
        env[DB_ENV] = url  # through the environment: a password never shows in the process list
        if args.runner == "local":
            env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, "-m", "sparvar_compiler", *base, "--worker", f"w{i}",
               "--worker-slot", f"{i}/{args.workers}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def stream(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            print(f"[w{i}] {line}", end="", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=stream, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    bad = [(i, c) for i, c in enumerate(codes) if c]
    if bad:
        note(f"sparvar-compile: error: worker(s) {', '.join(f'w{i} (exit {c})' for i, c in bad)} failed")
        return EXIT_FAILED if bad[0][1] != EXIT_USAGE else EXIT_USAGE
    return EXIT_OK


def _cmd_db(args: argparse.Namespace) -> int:
    from .db import TuningDatabase, export_json, import_json

    if args.action == "stats":
        from .db import LayeredDatabase, collect_environment
        from .db.report import format_stats

        # One shape either way: a named database is a stack of one layer.
        db = LayeredDatabase(TuningDatabase.open(args.db, readonly=True)) if args.db else _open_db(None, True)
        try:
            stats = db.stats(collect_environment(probe_gpu=False))
        finally:
            db.close()
        if args.json:
            print_json(stats)
        else:
            print(format_stats(stats))
        return EXIT_OK
    if not args.file:
        raise PlanConfigError(f"db {args.action} needs a FILE")
    url = _write_db_url(args)
    if args.action == "export":
        problem = output_path_problem(args.file, directory=False)
        if problem:
            raise OutputPathError(f"db export: {problem}")
        import tempfile

        with contextlib.ExitStack() as stack:
            cache = _sqlite_file(url) if not (args.db or os.environ.get(DB_ENV)) else None
            if cache is not None and not cache.exists():
                # The cache database is made by the first tune or import; until then it holds nothing, and
                # exporting it is an empty export (written from a scratch database: nothing is created here).
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "empty.sqlite"
                db = stack.enter_context(TuningDatabase.open(scratch))
                where = f"{cache} (not there yet: nothing to export)"
            else:
                db = stack.enter_context(TuningDatabase.open(url, readonly=True))
                where = mask_url(db.url)
            doc = export_json(db, args.file)
            counts = {"file": str(args.file), "database": where, "winners": len(doc.get("winners", [])),
                      "trials": len(doc.get("trials", [])), "targets": len(doc.get("targets", [])),
                      "workloads": len(doc.get("workloads", []))}
        if args.json:
            print_json(counts)
        else:
            print(f"exported {counts['winners']} winners ({counts['trials']} trials) from {counts['database']} "
                  f"to {args.file}")
        return EXIT_OK
    if not Path(args.file).is_file():
        raise PlanConfigError(f"db import: {args.file} " + ("is not a file" if Path(args.file).exists() else
                                                            "does not exist"))
    with TuningDatabase.open(url) as db:
        counts = {"file": str(args.file), "database": mask_url(db.url), **import_json(db, args.file)}
    if args.json:
        print_json(counts)
    else:
        rest = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if k not in ("file", "database"))
        print(f"imported {args.file} into {counts['database']}: {rest}")
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models():
        m = get_model(name)
        rows.append({"name": name, "family": m.family, "depth": m.depth, "width": m.width, "heads": m.heads,
                     "head_dim": m.head_dim, "resolutions": list(m.resolutions),
                     "default_resolution": m.default_resolution,
                     "schedules": [{"resolution": s.resolution, "aspect": s.aspect} for s in m.schedules],
                     "notes": m.notes})
    if args.json:
        print_json({"models": rows})
        return EXIT_OK
    for r in rows:
        res = ", ".join(str(x) for x in r["resolutions"])
        print(f"{r['name']:14} depth {r['depth']:2}  width {r['width']:4}  heads {r['heads']:2}  head_dim "
              f"{r['head_dim']:3}  resolutions {res}  ({len(r['schedules'])} schedules) {r['notes']}")
    return EXIT_OK


def _cmd_gpus(args: argparse.Namespace) -> int:
    gpus = [get_gpu(name) for name in list_gpus()]
    if args.json:
        print_json({"gpus": [{**g.to_dict(), "device_names": list(g.device_names)} for g in gpus]})
        return EXIT_OK
    for g in gpus:
        print(f"{g.name:10} {g.arch:7} {g.sm_count:4} SMs  {g.smem_per_block // 1024} KB shared memory per block")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- doctor
# (label, distribution names tried in order)
DOCTOR_PACKAGES = (
    ("sparvar-compiler", ("sparvar-compiler",)), ("torch", ("torch",)), ("triton", ("triton",)),
    ("numpy", ("numpy",)), ("sqlalchemy", ("sqlalchemy", "SQLAlchemy")), ("optuna", ("optuna",)),
    ("jinja2", ("jinja2", "Jinja2")), ("pyyaml", ("pyyaml", "PyYAML")), ("tqdm", ("tqdm",)),
    ("tvm", ("apache-tvm", "tvm")), ("apache-tvm-ffi", ("apache-tvm-ffi",)),
    ("psycopg", ("psycopg", "psycopg-binary")), ("matplotlib", ("matplotlib",)),
)
DISTRIBUTIONS = {label: names[0] for label, names in DOCTOR_PACKAGES}
CORE = ("torch", "triton", "numpy", "sqlalchemy", "jinja2", "pyyaml")
# feature -> (what it is, packages it needs, the extra that installs them)
FEATURES = {
    "compile": ("compile modules for any registered GPU, no GPU needed (core)", CORE, None),
    "tune": ("tune kernels on this host (needs the target GPU here)", (*CORE, "optuna"), None),
    "tvm": ("TVM kernel backend (--backend tvm)", ("tvm", "apache-tvm-ffi"), "tvm"),
    "postgres": ("PostgreSQL tuning database shared by a fleet", ("psycopg",), "postgres"),
    "plots": ("pictures: plan/inspect --plot, fidelity heat maps", ("matplotlib",), "plot"),
    "runtime": ("load and run an emitted module (runtime.load)", ("torch", "numpy", "pyyaml"), None),
}


def _dist_version(names: Sequence[str]) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        except Exception:  # noqa: BLE001 - a broken installation reads as missing
            continue
    return None


def _gpu_report() -> dict[str, Any]:
    """torch's view of the GPU (never raises): availability, name, arch, SM count, the registered GPU."""
    from .planner.gpus import gpu_from_device_name

    out: dict[str, Any] = {"cuda_available": False, "devices": 0, "name": None, "arch": None, "sm_count": None,
                           "registered": None, "torch_cuda": None, "error": None}
    try:
        import torch

        out["torch_cuda"] = getattr(torch.version, "cuda", None)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            g = gpu_from_device_name(props.name, props.multi_processor_count)
            out.update(cuda_available=True, devices=torch.cuda.device_count(), name=props.name,
                       arch=f"sm_{props.major}{props.minor}", sm_count=props.multi_processor_count,
                       registered=g.name if g is not None else None)
    except Exception as e:  # noqa: BLE001 - doctor reports, never crashes
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _driver_report() -> dict[str, Any]:
    out: dict[str, Any] = {"cuda_driver_api": None, "nvidia_driver": None}
    try:
        from .runtime.cuda_driver import CudaDriver

        v = CudaDriver().driver_version()
        out["cuda_driver_api"] = f"{v // 1000}.{v % 1000 // 10}"
    except Exception:  # noqa: BLE001 - no driver library: no version
        pass
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            text = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10).stdout.strip().splitlines()
            out["nvidia_driver"] = text[0].strip() if text else None
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def _tools_report() -> dict[str, Any]:
    import shutil

    tools: dict[str, Any] = {name: shutil.which(name) for name in ("nvcc", "cuobjdump", "ptxas", "nvidia-smi")}
    try:  # Triton ships its own ptxas, which is what compiles our Triton kernels for a named GPU
        from importlib.util import find_spec

        spec = find_spec("triton")
        if spec is not None and spec.submodule_search_locations:
            bundled = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / "ptxas"
            tools["triton_ptxas"] = str(bundled) if bundled.is_file() else None
    except Exception:  # noqa: BLE001
        tools["triton_ptxas"] = None
    return tools


def _database_paths() -> tuple[Path, Path]:
    """The user (cache) and shipped database paths, as :mod:`sparvar_compiler.db` resolves them."""
    try:
        from .db import shipped_database_path, user_database_path

        return user_database_path(), shipped_database_path()
    except ImportError:
        # The db package needs SQLAlchemy; doctor must still say where the files would be (same rules).
        from .resources import data_dir

        root, xdg = os.environ.get("SPARVAR_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME")
        user = (Path(root).expanduser() if root else
                (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sparvar") / "tuning.sqlite"
        return user, data_dir("tuning_db") / "sparvar.sqlite"


def _database_report() -> dict[str, Any]:
    """Paths only: nothing is opened (or created)."""
    out: dict[str, Any] = {}
    env = os.environ.get(DB_ENV)
    out["sparvar_db"] = mask_url(env) if env else None
    try:
        user, shipped = _database_paths()
        out.update(user=str(user), user_exists=user.is_file(), shipped=str(shipped), shipped_exists=shipped.is_file())
        top = out["sparvar_db"] or out["user"]
        out["compile_uses"] = [top, out["shipped"]] if shipped.is_file() else [top]
    except Exception as e:  # noqa: BLE001 - doctor reports, never crashes
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def doctor_report() -> dict[str, Any]:
    """Everything ``doctor`` prints, as data: ``python``, ``platform``, ``packages`` (label -> version or None),
    ``gpu``, ``driver``, ``tools``, ``databases``, ``triton_cache`` and ``features`` (name -> ``ok``,
    ``missing``, ``install``, ``what``)."""
    import platform

    packages = {label: _dist_version(names) for label, names in DOCTOR_PACKAGES}
    packages["sparvar-compiler"] = packages["sparvar-compiler"] or __version__
    gpu = _gpu_report() if packages["torch"] else {"cuda_available": False, "error": "torch is not installed"}
    tools = _tools_report()
    features: dict[str, Any] = {}
    for name, (what, needs, extra) in FEATURES.items():
        missing = [p for p in needs if not packages.get(p)]
        if name == "tune":
            if not gpu.get("cuda_available"):
                missing.append("a CUDA GPU")
            elif not gpu.get("registered"):
                missing.append(f"a registered GPU ({', '.join(list_gpus())}); this one is {gpu.get('name')}")
        if name == "tvm" and not tools.get("nvcc"):
            missing.append("nvcc (builds TVM's CUDA kernels)")
        install = None
        packages_missing = [p for p in missing if p in needs]
        if packages_missing:
            install = (f"pip install 'sparvar-compiler[{extra}]'" if extra else
                       "pip install " + " ".join(DISTRIBUTIONS.get(p, p) for p in packages_missing))
        features[name] = {"ok": not missing, "what": what, "missing": missing, "install": install}
    return {
        "python": platform.python_version(), "executable": sys.executable,
        "platform": platform.platform(), "packages": packages, "gpu": gpu, "driver": _driver_report(),
        "tools": tools, "databases": _database_report(),
        "triton_cache": os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache"),
        "features": features,
    }


def format_doctor(r: dict[str, Any]) -> str:
    lines = [f"python            {r['python']} ({r['executable']})", f"platform          {r['platform']}", "",
             "packages"]
    for label, version in r["packages"].items():
        lines.append(f"  {label:<18}{version or 'missing'}")
    g = r["gpu"]
    lines += ["", "GPU"]
    if g.get("cuda_available"):
        reg = g["registered"] or f"not registered ({', '.join(list_gpus())})"
        lines.append(f"  {g['name']}: {g['arch']}, {g['sm_count']} SMs, {g['devices']} device(s); registered GPU: "
                     f"{reg}")
    else:
        lines.append("  no CUDA GPU visible to torch" + (f" ({g['error']})" if g.get("error") else ""))
    d = r["driver"]
    lines.append(f"  CUDA driver API {d['cuda_driver_api'] or '-'}, NVIDIA driver {d['nvidia_driver'] or '-'}, "
                 f"torch built for CUDA {g.get('torch_cuda') or '-'}")
    lines += ["", "tools"]
    for name, path in r["tools"].items():
        lines.append(f"  {name:<16}{path or 'not found'}")
    db = r["databases"]
    lines += ["", "databases"]
    if "error" in db:
        lines.append(f"  error: {db['error']}")
    else:
        lines.append(f"  user            {db['user']}{'' if db['user_exists'] else ' (not created yet)'}")
        lines.append(f"  shipped         {db['shipped']}{'' if db['shipped_exists'] else ' (missing)'}")
        lines.append(f"  compile reads   {' over '.join(db['compile_uses'])} (tune and db import write to the "
                     "first)")
    lines.append(f"  {DB_ENV:<16}{db['sparvar_db'] or 'not set'}")
    lines.append(f"triton cache      {r['triton_cache']}")
    lines += ["", "features"]
    for name, f in r["features"].items():
        state = "ok" if f["ok"] else "missing " + "; ".join(f["missing"])
        lines.append(f"  {name:<9} {state}" + (f"  -> {f['install']}" if f["install"] else ""))
        lines.append(f"  {'':<9} {f['what']}")
    return "\n".join(lines)


def _cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor_report()
    if args.json:
        print_json(report)
    else:
        print(format_doctor(report))
    return EXIT_OK  # missing features are reported, not failures


# ---------------------------------------------------------------------------------------------- parser
def _add_kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", type=kernel_backends, default=("triton",),
                   help="comma-separated kernel backends (triton, tvm; default triton)")
    p.add_argument("--block-sizes", type=block_sizes, default=(64, 128),
                   help="layout block sizes the tuner may choose from (powers of two, 16..256; default 64,128)")
    p.add_argument("--trials", type=int_range(1), default=24, help="configs measured per workload (>= 1)")
    p.add_argument("--budget-s", type=float_range(0), help="time budget per workload, seconds (> 0)")


_BATCH = int_range(1, MAX_BATCH)


def _add_json(p: argparse.ArgumentParser, what: str = "the results") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON document on stdout")


_DB_HELP = (f"tuning database URL or path, used alone (default: {{default}}); a PostgreSQL URL is best given "
            f"as ${DB_ENV} (keeps the password off the command line)")
_USER_DB = (f"${DB_ENV}, else the cache database ($SPARVAR_CACHE_DIR, $XDG_CACHE_HOME/sparvar or "
            "~/.cache/sparvar)/tuning.sqlite")
_READ_DB = f"${DB_ENV} (else the cache database) over the shipped one"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sparvar-compile",
        description="Compile a VAR model's scale schedule into block-sparse attention kernels (SparVAR).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sparvar-compiler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compile", help="plan, generate, tune and emit a runtime module (the main job)")
    add_plan_args(p)
    p.add_argument("--gpu", required=True, help=f"target GPU ({', '.join(list_gpus())})")
    p.add_argument("-o", "--output", type=module_directory,
                   help="output directory of the runtime module (an existing one is replaced only if it is a "
                        "sparvar module)")
    p.add_argument("--force", action="store_true",
                   help="replace the -o directory even if it is not a sparvar module (everything in it is lost)")
    p.add_argument("--db", type=database_location, help=_DB_HELP.format(default=_READ_DB))
    p.add_argument("--tune", choices=("auto", "never", "always"), default="auto",
                   help="tune what the database lacks: auto = when the target GPU is present here (no tuning: "
                        "the databases are only read)")
    p.add_argument("--batch", type=_BATCH, default=2,
                   help=f"batch the kernels are tuned at (1..{MAX_BATCH}; default 2: CFG of one image); any "
                        "batch runs")
    _add_kernel_args(p)
    _add_json(p, "the summary (module path, kernels, tuned flags, expected ms, tuning)")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("tune", help="tune the plan's kernels on the local GPU into the tuning database")
    add_plan_args(p)
    p.add_argument("--gpu", required=True)
    p.add_argument("--db", type=database_location,
                   help=_DB_HELP.format(default=_USER_DB) + "; workers sharing one database share one Optuna "
                                                            "study per workload")
    p.add_argument("--worker", help="a name for this worker in the records")
    p.add_argument("--worker-slot", type=_worker_slot, metavar="I/K",
                   help="this worker is number I of K sharing --db: it starts on workload I*n/K (--workers sets "
                        "it; without it a named worker starts at a hash of its name)")
    p.add_argument("--workers", type=int_range(1, 1024), default=1,
                   help="run K worker processes sharing --db and its studies (local runner: worker i on GPU i)")
    p.add_argument("--runner", choices=("local", "bundle", "replay"), default="local",
                   help="local: measure on this GPU; bundle: compile candidates into --bundle DIR for a GPU host "
                        "without compilers; replay: ingest that host's --replay results into the database")
    p.add_argument("--bundle", type=output_directory, help="bundle directory (--runner bundle)")
    p.add_argument("--replay", type=input_file, help="measured results file (--runner replay)")
    p.add_argument("--batch", type=_BATCH, default=2,
                   help=f"batch to tune at (1..{MAX_BATCH}; default 2: CFG of one image)")
    _add_kernel_args(p)
    _add_json(p, "the winners table")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("verify", help="check a runtime module (hashes, manifest, files) without a GPU; exit 1 if bad")
    p.add_argument("directory", type=Path)
    p.add_argument("--gpu", help="also require that the module targets this GPU")
    _add_json(p, "the verdict ({\"ok\": ...})")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("inspect", help="print a runtime module's summary")
    p.add_argument("directory", type=Path)
    p.add_argument("--plot", type=output_file, metavar="FILE.png",
                   help="draw the layer x scale dispatch map and per-scale expected ms against dense")
    _add_json(p, "the module's summary")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("db", help="tuning database: stats, export winners to JSON, import them")
    p.add_argument("action", choices=("stats", "export", "import"))
    p.add_argument("file", nargs="?", type=Path)
    p.add_argument("--db", type=database_location,
                   help=_DB_HELP.format(default=f"stats: {_READ_DB}, what compile reads; export/import: "
                                                + _USER_DB))
    _add_json(p, "the statistics or counts")
    p.set_defaults(func=_cmd_db)

    p = sub.add_parser("plan", help="print the plan: per scale grid, lengths, modes and block sparsity")
    add_plan_args(p)
    p.add_argument("--block-m", type=int, help="query block (16..256, power of two; default 128, --plot: the "
                                               "module's default block)")
    p.add_argument("--block-n", type=int, help="key block (as --block-m)")
    _add_json(p, "the plan (instead of the table)")
    p.add_argument("--export-layouts", type=output_directory, metavar="DIR",
                   help="write per CSLA scale scale<i>.npy (active blocks), scale<i>.blockmask.npz (FlexAttention "
                        "BlockMask) and scale<i>.bsr.npz (BSR, FlashInfer), and README.txt on loading them")
    p.add_argument("--plot", type=output_directory, metavar="DIR",
                   help="write scale<i>.png pictures of the layouts, key-scale boundaries drawn")
    p.set_defaults(func=_cmd_plan)

    from .fidelity.cli import add_commands as add_fidelity_commands

    add_fidelity_commands(sub)  # fidelity, calibrate
    p = sub.add_parser("models", help="list registered models")
    _add_json(p, "the models")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("gpus", help="list registered GPUs")
    _add_json(p, "the GPUs")
    p.set_defaults(func=_cmd_gpus)
    p = sub.add_parser("doctor", help="versions, the GPU, database paths and what each feature is missing")
    _add_json(p, "the report")
    p.set_defaults(func=_cmd_doctor)
    return parser


def _install_hint(e: ModuleNotFoundError) -> str | None:
    """How to install the dependency whose import failed, or None if it is not one of ours (a bug)."""
    root = (e.name or "").split(".")[0]
    if root in EXTRAS:
        return f"pip install 'sparvar-compiler[{EXTRAS[root]}]'"
    if root in REQUIRED:
        return f"pip install {REQUIRED[root]}"
    return None


# ---------------------------------------------------------------------------------------------- errors
def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _inputs(args: argparse.Namespace | None) -> str:
    """The files a verb reads, as ``--flag VALUE``: what a decode or value error without a file name is
    about."""
    if args is None:
        return "the command line"
    found = []
    model = getattr(args, "model", None)
    if model and (Path(model).suffix.lower() in (".yaml", ".yml", ".json") or os.sep in model):
        found.append(f"--model {model}")
    for attr, flag in (("plan_config", "--plan-config"), ("replay", "--replay"), ("captures", "--captures")):
        if getattr(args, attr, None) is not None:
            found.append(f"{flag} {getattr(args, attr)}")
    if args.command == "db" and args.action == "import" and args.file is not None:
        found.append(f"db import {args.file}")
    if args.command in ("verify", "inspect"):
        found.append(f"module {args.directory}")
    return ", ".join(found) or f"{args.command}'s input"


def _outputs(args: argparse.Namespace | None) -> str | None:
    """The paths a verb writes, as ``--flag VALUE``: what an OS error without a file name is about."""
    if args is None:
        return None
    found = [f"{flag} {getattr(args, attr)}" for attr, flag in
             (("output", "-o"), ("bundle", "--bundle"), ("export_layouts", "--export-layouts"), ("plot", "--plot"))
             if getattr(args, attr, None) is not None]
    if args.command == "calibrate" and args.json is not None:
        found.append(f"--json {args.json}")
    if args.command == "db" and args.action == "export" and args.file is not None:
        found.append(f"db export {args.file}")
    return ", ".join(found) or None


def _databases(args: argparse.Namespace | None) -> str:
    """The database a verb opened, password masked: what a database error is about."""
    if args is not None and args.command == "calibrate":
        return f"the Optuna storage {mask_url(args.storage)}" if args.storage else "the Optuna study"
    url = (getattr(args, "db", None) if args is not None else None) or os.environ.get(DB_ENV)
    if url:
        return f"the tuning database {mask_url(url)}"
    user, shipped = _database_paths()
    if args is not None and (args.command == "compile" or (args.command == "db" and args.action == "stats")):
        return f"the tuning database {user} (or the shipped {shipped})"
    return f"the tuning database {user}"


def _is_database_error(e: BaseException) -> bool:
    import sqlite3

    if isinstance(e, sqlite3.Error):
        return True
    exc = sys.modules.get("sqlalchemy.exc")  # not imported: no SQLAlchemy error can have been raised
    if exc is not None and isinstance(e, exc.SQLAlchemyError):
        return True
    optuna_exc = sys.modules.get("optuna.exceptions")
    return optuna_exc is not None and isinstance(e, optuna_exc.StorageInternalError)


def _database_message(e: BaseException) -> str:
    """The driver's own words (SQLAlchemy wraps them with the SQL statement and a link: both dropped)."""
    orig = getattr(e, "orig", None)
    text = f"{type(orig).__name__}: {orig}" if orig is not None else f"{type(e).__name__}: {e}"
    return text.split("[SQL:", 1)[0].split("(Background on this error", 1)[0]


def _os_error(e: OSError, args: argparse.Namespace | None) -> str:
    """``PATH: the OS's words``; without a path, the verb's outputs for an error only writing meets (a full
    disk), else the verb."""
    import errno

    what = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        where = os.fsdecode(e.filename) if isinstance(e.filename, bytes) else str(e.filename)
        if e.filename2 is not None:
            where += f" -> {os.fsdecode(e.filename2) if isinstance(e.filename2, bytes) else e.filename2}"
        return f"{where}: {what}"
    outputs = _outputs(args)
    if outputs and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return f"{what} (writing {outputs})"
    return f"{args.command}: {what}" if args is not None else what


def boundary_error(e: BaseException, args: argparse.Namespace | None) -> str | None:
    """The one line of an error met where input is read or output written (the OS, a decoder, a database, a
    value that does not fit), naming the input and the problem; None for anything else (a bug: shown whole)."""
    import zipfile

    if isinstance(e, OSError):
        return _os_error(e, args)
    if _is_database_error(e):
        return f"{_databases(args)}: {_database_message(e)}"
    yaml = sys.modules.get("yaml")
    if isinstance(e, UnicodeDecodeError):
        return f"{_inputs(args)}: not UTF-8 text ({e.reason} at byte {e.start})"
    if isinstance(e, json.JSONDecodeError):
        return f"{_inputs(args)}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if yaml is not None and isinstance(e, yaml.YAMLError):
        return f"{_inputs(args)}: not valid YAML ({e})"
    if isinstance(e, zipfile.BadZipFile):
        return f"{_inputs(args)}: not a valid .npz (zip) file ({e})"
    if isinstance(e, RecursionError):
        return f"{_inputs(args)}: nested too deeply to read"
    if isinstance(e, MemoryError):
        return f"{_inputs(args)}: too large to read into memory"
    if isinstance(e, (ValueError, TypeError, LookupError)):
        return f"{_inputs(args)}: {type(e).__name__}: {e}"
    return None


def _sparvar_error(e: SparvarError, args: argparse.Namespace | None) -> str:
    """Our own error's message; a database error that does not name its database gets it named."""
    text = str(e)
    schema = sys.modules.get("sparvar_compiler.db.schema")
    if schema is not None and isinstance(e, schema.TuningDatabaseError) and args is not None:
        url = getattr(args, "db", None) or os.environ.get(DB_ENV)
        names = [str(url), mask_url(url)] if url else [str(p) for p in _database_paths()]
        if not any(name in text for name in names):
            text = f"{_databases(args)}: {text}"
    return text


def error_line(text: object) -> str:
    """``sparvar-compile: error: TEXT`` on one line, any password in a URL masked."""
    return f"sparvar-compile: error: {mask_urls(one_line(text))}"


def _quiet_stdout() -> None:
    """stdout's reader went away (``| head``): send the rest to /dev/null so the exit flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a captured stdout)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sparvar-compile ARGV``; returns the exit status (module docstring), never raises: an error is one
    line on stderr (``SPARVAR_DEBUG=1``: raised, with its traceback), except a bug, which keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["compile", *argv]
    args = None
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # a usage error (one line, 2), --help or --version (0)
            return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
        args.argv = argv  # what a parent process re-runs in its workers (tune --workers)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if args.command in DB_VERBS:
            check_database_env()
        return int(args.func(args))
    except KeyboardInterrupt:
        note("sparvar-compile: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_FAILED
    except SparvarError as e:
        if _debug():
            raise
        note(error_line(_sparvar_error(e, args)))
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        if _debug():
            raise
        hint = _install_hint(e)
        if hint is None:
            note(error_line(f"this needs the Python module {e.name}, which is not installed {DEBUG_HINT}"))
        else:
            note(error_line(f"this needs {e.name}, which is not installed: {hint} ('sparvar-compile doctor' lists "
                            "what each feature needs)"))
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the boundary: one line for input and environment errors
        line = boundary_error(e, args)
        if line is None or _debug():
            raise
        note(error_line(f"{line} {DEBUG_HINT}"))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
