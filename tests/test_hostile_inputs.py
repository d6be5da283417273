"""Hostile and careless inputs (issue 15): every size is bounded where it is read, before anything sized by it
is allocated, and every bad input ends in one SparvarError naming the field (the CLI: exit 2, one line).

Each test runs under an address-space cap (current use + 2 GiB, :func:`memory_cap`), so a missing bound fails
here with MemoryError instead of exhausting the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import numpy.lib.format as npy_format
import pytest
import torch
import yaml

from sparvar_compiler import limits
from sparvar_compiler.arrays import ArrayFileError, npz_headers, read_npz, safetensors_headers
from sparvar_compiler.cli import main
from sparvar_compiler.cli_args import parse_windows
from sparvar_compiler.cs4a.select import tables_mask, token_tables
from sparvar_compiler.errors import LayoutError, ModelError, PlanConfigError, ScheduleError, SparvarError
from sparvar_compiler.fidelity.captures import CaptureError, CaptureSet
from sparvar_compiler.fidelity.tensorfile import TensorFileError, read_tensors, write_tensors
from sparvar_compiler.planner import Plan, PlanConfig, make_plan
from sparvar_compiler.planner.config import config_from_mapping, load_config_file
from sparvar_compiler.planner.cs4a import cs4a_tables
from sparvar_compiler.planner.layout import BlockLayout
from sparvar_compiler.planner.models import load_model_file
from sparvar_compiler.planner.schedules import parse_resolution, parse_schedule

HEADROOM = 2 << 30


def _address_space_in_use() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.fixture(autouse=True)
def memory_cap():
    """Cap this process's address space at what it uses now + 2 GiB for the test, then restore the old cap."""
    try:
        import resource
    except ImportError:
        yield
        return
    used = _address_space_in_use()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = None if used is None else used + HEADROOM
    if cap is not None and hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    try:
        if cap is not None and (soft == resource.RLIM_INFINITY or cap < soft):
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        else:
            cap = None
    except (ValueError, OSError):  # not settable here: run uncapped
        cap = None
    try:
        yield
    finally:
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and len(text) < 600, text
    return text


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


# --------------------------------------------------------------------------------------------- model YAML
MODEL = """name: tiny-hostile
family: var
depth: 4
heads: 2
head_dim: 64
width: 128
schedules:
  - resolution: 128
    scales: SCALES
"""


def _model_file(tmp_path, scales: str, **changes) -> str:
    text = MODEL.replace("SCALES", scales)
    for k, v in changes.items():
        text = text.replace(f"{k}: ", f"{k}: {v} #", 1)
    p = tmp_path / "m.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("scales, field, limit", [
    ('"1,2,4,1000"', r"scales\[3\]: grid height 1000", "MAX_GRID_SIDE"),
    ("[1, 2, 4, [1000, 1000]]", r"scales\[3\]: grid height 1000", "MAX_GRID_SIDE"),
    ('"1,2,4,1000000000000000000x1"', r"scales\[3\]: grid height of 19 digits", "MAX_GRID_SIDE"),
    ('"1,2,4,300"', r"scales\[3\]: tokens of grid 300x300 90000", "MAX_TOKENS_PER_SCALE"),
    ('"' + ",".join(["1"] * 65) + '"', "number of scales 65", "MAX_SCALES"),
    ("[" + ", ".join(["1"] * 100000) + "]", "number of scales 100000", "MAX_SCALES"),
    ('"' + ",".join(["256"] * 5) + '"', "key/value length", "MAX_KV_LEN"),
])
def test_model_schedule_over_a_limit_names_the_field(tmp_path, scales, field, limit):
    path = _model_file(tmp_path, scales)
    with pytest.raises(ModelError, match=field) as e:
        load_model_file(Path(path))
    assert limit in _one_line(e.value)


def test_model_1000x1000_grid_on_the_command_line_exits_2(tmp_path, capsys):
    code, err = _run(["plan", "--model", _model_file(tmp_path, '"1,2,4,1000x1000"')], capsys)
    assert code == 2 and "MAX_GRID_SIDE" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("field, value, limit", [
    ("depth", 10 ** 9, "MAX_DEPTH"), ("heads", 10 ** 6, "MAX_HEADS"), ("head_dim", 10 ** 6, "MAX_HEAD_DIM"),
    ("width", 10 ** 12, "MAX_WIDTH"),
])
def test_model_shape_over_a_limit_is_refused(tmp_path, field, value, limit):
    path = _model_file(tmp_path, '"1,2,3,4"', **{field: value})
    with pytest.raises(ModelError, match=f"'{field}'.*{value}.*over the limit") as e:
        make_plan(path)  # by the model file's reader
    _one_line(e.value)
    spec = dataclasses.replace(load_model_file(Path(_model_file(tmp_path, '"1,2,3,4"'))), **{field: value})
    with pytest.raises(ModelError, match=f"'{field}' {value} is over the limit") as e:
        make_plan(spec)  # by the planner, for a spec built in Python
    assert limit in _one_line(e.value)


def test_plan_from_a_dict_bounds_depth_and_grids():
    d = json.loads(make_plan("infinity-2b", 256).to_json())
    with pytest.raises(ModelError, match="'depth' 1000000000 is over the limit"):
        Plan.from_dict({**d, "depth": 10 ** 9})
    with pytest.raises(ScheduleError, match="MAX_GRID_SIDE"):
        Plan.from_dict({**d, "grids": d["grids"][:-1] + [[1000, 1000]]})
    with pytest.raises(PlanConfigError, match="do not follow"):
        Plan.from_dict({**d, "scales": d["scales"][:-1] + [{**d["scales"][-1], "kv_len": 10 ** 12}]})
    assert Plan.from_dict(d) == make_plan("infinity-2b", 256)


@pytest.mark.parametrize("text", ["1" * 5000, "²", "١٠٢٤"])
def test_resolution_text_that_int_would_choke_on(text):
    with pytest.raises(ScheduleError, match="unknown resolution"):
        parse_resolution(text, (256, 1024))


def test_grid_of_unicode_digits_is_one_error():
    with pytest.raises(ScheduleError, match=r"schedule\[1\]"):
        parse_schedule("1,²")


# --------------------------------------------------------------------------------------------- YAML files
BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_safe_load_shares_aliases_so_the_bomb_only_explodes_when_walked():
    """Why the node count is needed: safe_load itself is fast (aliases are shared, not copied), and 10^9 nodes
    appear only in whatever walks the result, such as the repr of an error message."""
    t = time.perf_counter()
    data = yaml.safe_load(BOMB)
    assert time.perf_counter() - t < 1.0
    assert data["i"][0] is data["i"][1]


@pytest.mark.parametrize("body, match", [
    (BOMB + "windows: *i\n", "MAX_YAML_NODES"),
    ("windows: " + "[" * 5000 + "]" * 5000 + "\n", "MAX_YAML_DEPTH"),
    ("x: &x [*x]\nwindows: *x\n", "MAX_YAML_DEPTH"),
    ("group_size: " + "9" * 5000 + "\n", "cannot convert"),
    ("group_size: [1, 2\n", "not valid YAML"),
])
def test_plan_config_yaml_bombs_and_junk_are_one_error(tmp_path, body, match):
    p = tmp_path / "plan.yaml"
    p.write_text(body)
    with pytest.raises(PlanConfigError, match=match) as e:
        load_config_file(p)
    assert str(p) in _one_line(e.value)


def test_plan_config_over_the_size_limit(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("# " + "x" * limits.MAX_YAML_BYTES + "\n")
    with pytest.raises(PlanConfigError, match="MAX_YAML_BYTES"):
        load_config_file(p)


def test_non_utf8_plan_config(tmp_path, capsys):
    p = tmp_path / "plan.yaml"
    p.write_bytes("group_size: 192 # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PlanConfigError, match="not UTF-8 text"):
        load_config_file(p)
    code, err = _run(["plan", "--model", "infinity-2b", "--resolution", "256", "--plan-config", str(p)], capsys)
    assert code == 2 and "not UTF-8" in err and len(err.splitlines()) == 1


def test_non_utf8_model_yaml(tmp_path, capsys):
    p = tmp_path / "m.yaml"
    p.write_bytes(MODEL.replace("SCALES", '"1,2,3,4"').replace("tiny-hostile", "caf\u00e9").encode("latin-1"))
    with pytest.raises(ModelError, match="not UTF-8 text"):
        load_model_file(p)
    code, err = _run(["plan", "--model", str(p)], capsys)
    assert code == 2 and "not UTF-8" in err and len(err.splitlines()) == 1


def test_model_yaml_bomb(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(BOMB + MODEL.replace("SCALES", '"1,2,3,4"').replace("name: tiny-hostile", "name: *i"))
    with pytest.raises(ModelError, match="MAX_YAML_NODES"):
        load_model_file(p)


# --------------------------------------------------------------------------------------------- plan configs
@pytest.mark.parametrize("windows", ["-1x10000000000", "-1x100000000"])
def test_windows_repeat_count_is_checked_before_the_list_is_built(windows, capsys):
    t = time.perf_counter()
    with pytest.raises(argparse.ArgumentTypeError, match="MAX_WINDOW_COUNT"):
        parse_windows(windows)
    code, err = _run(["plan", "--model", "infinity-2b", f"--windows={windows}"], capsys)
    assert time.perf_counter() - t < 1.0
    assert code == 2 and "--windows" in err and "MAX_WINDOW_COUNT" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("windows, match", [
    ("1x" + "9" * 5000, "5000 digits"), ("1x0", "at least 1"), ("1x-3", "at least 1"), ("axb", "not a window"),
])
def test_windows_flag_junk(windows, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        parse_windows(windows)


def test_group_size_of_10_8(tmp_path, capsys):
    p = tmp_path / "plan.yaml"
    p.write_text("group_size: 100000000\n")
    with pytest.raises(PlanConfigError, match="'group_size' 100000000 is over the limit of 65536") as e:
        load_config_file(p)
    assert "MAX_GROUP_SIZE" in _one_line(e.value)
    with pytest.raises(PlanConfigError, match="group_size"):
        PlanConfig(group_size=10 ** 8)
    code, err = _run(["plan", "--model", "infinity-2b", "--resolution", "256", "--plan-config", str(p)], capsys)
    assert code == 2 and "group_size" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("option, value, match", [
    ("key_tile", 0, "'key_tile' must be >= 1"),
    ("key_tile", 10 ** 9, "'key_tile' 1000000000 is over the limit"),
    ("key_tile", True, "'key_tile' must be an integer"),
    ("key_tile", 112.0, "'key_tile' must be an integer"),
    ("group_size", 100, "'group_size' must be a multiple of 16"),
    ("group_size", False, "'group_size' must be an integer"),
    ("decision_scale", 10 ** 6, "'decision_scale' 1000000 is over the limit"),
    ("bound_layer", 10 ** 6, "'bound_layer' 1000000 is over the limit"),
    ("sink_scales", 10 ** 6, "'sink_scales' 1000000 is over the limit"),
    ("skip_last", -1, "'skip_last' must be >= 0"),
    ("skip_last", 10 ** 6, "'skip_last' 1000000 is over the limit"),
    ("dcsla_block", 10 ** 6, "'dcsla_block' 1000000 is over the limit"),
    ("dcsla_min_blocks", 10 ** 9, "'dcsla_min_blocks' 1000000000 is over the limit"),
    ("topk_fraction", float("nan"), "'topk_fraction' must be a number in"),
    ("topk_fraction", True, "'topk_fraction' must be a number in"),
    ("dcsla_coverage", float("inf"), "'dcsla_coverage' must be a number in"),
    ("windows", [-1] * 100000, "'windows' entry count 100000 is over the limit"),
    ("windows", ",".join(["1"] * 100000), "'windows' entry count 100000 is over the limit"),
    ("windows", [10 ** 9] * 13, r"windows\[0\] 1000000000 is over the limit"),
    ("windows", [True] * 13, r"'windows\[0\]' must be an integer"),
    ("band_windows", [10 ** 9], r"band_windows\[0\] 1000000000 is over the limit"),
    ("band_windows", [0], r"band_windows\[0\] = 0 must be positive"),
    ("cs4a", ["token"], "'cs4a' must be one of"),
    ("residual", 1, "'residual' must be true or false"),
])
def test_every_numeric_option_is_bounded_and_type_checked(option, value, match):
    with pytest.raises(PlanConfigError, match=match) as e:
        config_from_mapping({option: value}, "cfg.yaml")
    assert "cfg.yaml" in _one_line(e.value)
    if not isinstance(value, str):
        with pytest.raises(PlanConfigError, match=match):  # built directly, as the Python API does
            PlanConfig(**{option: value})


def test_unknown_options_of_any_type_are_named():
    with pytest.raises(PlanConfigError, match="unknown option 1"):
        config_from_mapping({1: 2, "x": 3}, "cfg.yaml")


def test_cs4a_tables_are_bounded_before_they_are_built(tmp_path):
    """A 16-query group over a 256x256 scale: 4096 groups over a 65557-key cache."""
    plan = make_plan(_model_file(tmp_path, '"1,2,4,256"'), config=PlanConfig(group_size=16, bound_layer=4))
    with pytest.raises(PlanConfigError, match="'group_size' 16 makes 4096 query groups of scale 3") as e:
        cs4a_tables(plan)
    assert "MAX_TABLE_ELEMENTS" in _one_line(e.value)
    with pytest.raises(PlanConfigError, match="MAX_TABLE_ELEMENTS"):
        token_tables(plan, 3)


def test_tables_mask_of_a_group_larger_than_the_scale_stays_small():
    """One group of 10^8 queries over 100 queries: the mask is [B, H, 100, kv], never [B, H, 10^8, kv]."""
    num = torch.full((2, 4, 1), 3, dtype=torch.int32)
    idx = torch.tensor([0, 5, 9], dtype=torch.int32).expand(2, 4, 1, 3).contiguous()
    mask = tables_mask(num, idx, 10 ** 8, 100, 50)
    assert mask.shape == (2, 4, 100, 50) and mask[..., [0, 5, 9]].all() and mask.sum() == 2 * 4 * 100 * 3
    blocks = tables_mask(num, idx, 10 ** 8, 100, 650, block_n=64)
    assert blocks.shape == (2, 4, 100, 650) and blocks[0, 0, 0, :64].all() and not blocks[0, 0, 0, 64:320].any()


# --------------------------------------------------------------------------------------------- npz files
def _npy(shape, descr="<f8", data: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    if data is None:
        data = b"\0" * (int(np.prod(shape, dtype=object)) * np.dtype(descr).itemsize)
    return buf.getvalue() + data


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _layout_members(layout: BlockLayout) -> dict[str, bytes]:
    out = {}
    for name, a in (("header", np.frombuffer(json.dumps(layout._header()).encode(), dtype=np.uint8)),
                    ("full_offsets", layout.full_offsets), ("full_indices", layout.full_indices),
                    ("partial_offsets", layout.partial_offsets), ("partial_indices", layout.partial_indices)):
        buf = io.BytesIO()
        np.save(buf, a)
        out[name + ".npy"] = buf.getvalue()
    return out


def test_npz_header_claiming_7_tib(tmp_path):
    """A 200-byte member whose header says (2^40,) float64: refused from the header, nothing allocated."""
    path = _zip(tmp_path / "huge.npz", {"q.npy": _npy((1 << 40,), data=b""),
                                        "k.npy": _npy((1 << 40,), data=b"")})
    for read, error in ((read_npz, ArrayFileError), (read_tensors, TensorFileError)):
        with pytest.raises(error, match=r"member 'q.npy': bytes of shape \[1099511627776\] 8796093022208 is over"
                                        ) as e:
            read(path)
        assert "MAX_ARRAY_BYTES" in _one_line(e.value)
    layout = _layout_members(BlockLayout.dense(64, 64, 32, 32))
    layout["full_indices.npy"] = _npy((1 << 40,), "<i4", data=b"")
    with pytest.raises(LayoutError, match="MAX_ARRAY_BYTES"):
        BlockLayout.from_npz(_zip(tmp_path / "layout.npz", layout))


@pytest.mark.parametrize("members, match", [
    ({"q.txt": b"hello"}, "member 'q.txt' is not an .npy array"),
    ({"q.npy": b"PK not an npy at all"}, "member 'q.npy': not an npy array"),
    ({"q.npy": _npy((2,), "|O", data=b"\x80\x04N.")}, "dtype |O is refused"),
    ({"q.npy": _npy((2,), "<M8[s]")}, "is refused"),
    ({"q.npy": _npy((1 << 20,), data=b"\0" * 16)}, "promises 8388608 bytes"),
    ({"q.npy": _npy((2,), data=b"\0" * 64)}, "promises 16 bytes"),
    ({"q.npy": _npy((1,) * 40)}, "MAX_ARRAY_DIMS"),
])
def test_npz_members_are_checked_from_their_headers(tmp_path, members, match):
    path = _zip(tmp_path / "x.npz", members)
    with pytest.raises(TensorFileError, match=match) as e:
        read_tensors(path)
    _one_line(e.value)
    with pytest.raises(ArrayFileError, match=match):
        npz_headers(path)


def test_npz_that_is_not_a_zip(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"\x93NUMPY not a zip")
    with pytest.raises(TensorFileError, match="not a readable .npz"):
        read_tensors(p)


def test_npz_round_trip_still_works(tmp_path, rng):
    a, b = rng.standard_normal((3, 4)).astype(np.float32), np.asfortranarray(rng.standard_normal((5, 2)))
    np.savez_compressed(tmp_path / "ok.npz", a=a, b=b, c=np.arange(7, dtype=">i8"))
    got = read_npz(tmp_path / "ok.npz")
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    np.testing.assert_array_equal(got["c"], np.arange(7))
    got["a"][0, 0] = 1.0  # writable, as np.load's arrays were


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update({"extra.npy": m["full_indices.npy"]}), "unknown member 'extra.npy'"),
    (lambda m: m.pop("full_offsets.npy"), "full_offsets.npy is missing"),
    (lambda m: m.update({"header.npy": _npy((3,), "|u1", b'{"a')}), "header: not JSON"),
    (lambda m: m.update({"header.npy": _npy((1 << 20,), "|u1")}), "MAX_LAYOUT_HEADER_BYTES"),
    (lambda m: m.update({"full_offsets.npy": _npy((7,), "<i4")}), r"full_offsets.npy has shape \[7\]; the header"),
    (lambda m: m.update({"full_offsets.npy": _npy((3,), "<f8")}), "expected 32-bit integers"),
    (lambda m: m.update({"full_indices.npy": _npy((5,), "<i4")}), "expected at most 4 kv block numbers"),
])
def test_layout_npz_must_agree_with_its_header(tmp_path, edit, match):
    members = _layout_members(BlockLayout.dense(64, 64, 32, 32))
    edit(members)
    with pytest.raises(LayoutError, match=match) as e:
        BlockLayout.from_npz(_zip(tmp_path / "l.npz", members))
    _one_line(e.value)


@pytest.mark.parametrize("header, match", [
    ({"format": 1, "q_len": 10 ** 12, "kv_len": 64, "block_m": 32, "block_n": 32}, "header q_len 1000000000000"),
    ({"format": 1, "q_len": True, "kv_len": 64, "block_m": 32, "block_n": 32}, "q_len must be a positive integer"),
    ({"format": 1, "q_len": 64, "kv_len": 64, "block_m": 7, "block_n": 32}, "block_m must be a power of two"),
    ({"format": 2, "q_len": 64, "kv_len": 64, "block_m": 32, "block_n": 32}, "layout format 2"),
    ({"format": 1, "q_len": 64, "kv_len": 10 ** 30, "block_m": 32, "block_n": 32}, "MAX_KV_LEN"),
])
def test_layout_npz_header_is_bounded(tmp_path, header, match):
    members = _layout_members(BlockLayout.dense(64, 64, 32, 32))
    members["header.npy"] = _npy((len(json.dumps(header)),), "|u1", json.dumps(header).encode())
    with pytest.raises(LayoutError, match=match):
        BlockLayout.from_npz(_zip(tmp_path / "l.npz", members))


# --------------------------------------------------------------------------------------------- safetensors
def _safetensors(path, header, body: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return path


@pytest.mark.parametrize("header, body, match", [
    ({"q": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, b"\0" * 8,
     "data_offsets must be two integers"),
    ({"q": {"dtype": "F32", "shape": [2], "data_offsets": [True, 8]}}, b"\0" * 8, "data_offsets must be two integers"),
    ({"q": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "k": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    # int64 would wrap these products to 0, which the old reader then matched against empty offsets
    ({"q": {"dtype": "F32", "shape": [2 ** 32, 2 ** 32], "data_offsets": [0, 0]}}, b"",
     r"bytes of shape \[4294967296, 4294967296\] 73786976294838206464 is over the limit"),
    ({"q": {"dtype": "F32", "shape": [2 ** 62, 4], "data_offsets": [0, 0]}}, b"", "MAX_ARRAY_BYTES"),
    ({"q": {"dtype": "F64", "shape": [1 << 20, 1 << 11], "data_offsets": [0, 1 << 34]}}, b"", "MAX_ARRAY_BYTES"),
    ({"q": {"dtype": "U8", "shape": [1 << 32], "data_offsets": [0, 1 << 32]}}, b"", "MAX_ARRAY_ELEMENTS"),
    ({"q": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative integers"),
    ({"q": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "hold 8 bytes, but shape"),
    ({"q": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside the 4 data bytes"),
    ({"q": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype 'PICKLE' is not supported"),
    ({"q": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, b"\0" * 8, "exactly dtype, shape"),
    (b'{"q": {"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}}', b"", "NaN is not JSON"),
    (b'{"q": {"dtype": "F32", "shape": [2], "data_offsets": [0, ' + b"9" * 5000 + b"]}}", b"",
     "MAX_JSON_NUMBER_DIGITS"),
    (b"[" * 100000 + b"]" * 100000, b"", "nested too deeply"),
    (b"\xff\xfe{}", b"", "not UTF-8"),
    ([1, 2], b"", "must be a JSON object"),
])
def test_safetensors_header_is_checked_before_reading(tmp_path, header, body, match):
    path = _safetensors(tmp_path / "x.safetensors", header, body)
    with pytest.raises(TensorFileError, match=match) as e:
        read_tensors(path)
    _one_line(e.value)


@pytest.mark.parametrize("length, match", [
    (2 ** 63, "header length 9223372036854775808 is over the limit"),
    (limits.MAX_SAFETENSORS_HEADER_BYTES, "is larger than the file"),
])
def test_safetensors_huge_header_length(tmp_path, length, match):
    path = _safetensors(tmp_path / "x.safetensors", b"{}", length=length)
    with pytest.raises(TensorFileError, match=match):
        read_tensors(path)
    with pytest.raises(ArrayFileError, match=match):
        safetensors_headers(path)


def test_safetensors_round_trip_still_works(tmp_path, rng):
    a = rng.standard_normal((2, 3, 5)).astype(np.float16)
    write_tensors(tmp_path / "ok.safetensors", {"a": a, "b": np.zeros(0, np.float32)}, {"note": "x"})
    got = read_tensors(tmp_path / "ok.safetensors")
    np.testing.assert_array_equal(got["a"], a)
    assert got["b"].shape == (0,)


# --------------------------------------------------------------------------------------------- captures
def test_capture_files_are_checked_from_their_headers(tmp_path):
    """A capture whose q claims a 7 TiB batch, then one whose offsets are floats: one CaptureError each."""
    path = _model_file(tmp_path, '"1,2,3,4"')
    spec = load_model_file(Path(path))
    cap = tmp_path / "caps"
    cap.mkdir()
    (cap / "captures.json").write_text(json.dumps({
        "format": "sparvar-captures", "version": 1, "model": "tiny-hostile", "resolution": 128,
        "entries": [{"scale": 0, "layer": 0, "file": "a.safetensors"}, {"scale": 1, "layer": 0, "file": "b.npz"}]}))
    entry = {"dtype": "F32", "shape": [2 ** 34, 2, 1, 64], "data_offsets": [0, 2 ** 34 * 2 * 64 * 4]}
    _safetensors(cap / "a.safetensors", {"q": entry, "k": entry, "v": entry})
    _zip(cap / "b.npz", {"q.npy": _npy((2 ** 34, 2, 4, 64), "<f4", b""), "k.npy": b"", "v.npy": b""})
    captures = CaptureSet.open(cap, spec)
    with pytest.raises(CaptureError, match="MAX_ARRAY_ELEMENTS|MAX_ARRAY_BYTES"):
        captures.qkv(0, 0)
    with pytest.raises(CaptureError, match="MAX_ARRAY_ELEMENTS|MAX_ARRAY_BYTES"):
        captures.qkv(1, 0)
    _safetensors(cap / "a.safetensors", {"q": {"dtype": "F32", "shape": [2, 2, 1, 64], "data_offsets": [0.0, 1024.0]}},
                 b"\0" * 1024)
    with pytest.raises(CaptureError, match="data_offsets must be two integers"):
        captures.qkv(0, 0)


def test_capture_index_is_bounded(tmp_path):
    cap = tmp_path / "caps"
    cap.mkdir()
    (cap / "captures.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CaptureError, match="nested too deeply"):
        CaptureSet.open(cap)
    (cap / "captures.json").write_text('{"format": "sparvar-captures", "version": ' + "1" * 5000 + "}")
    with pytest.raises(CaptureError, match="MAX_JSON_NUMBER_DIGITS"):
        CaptureSet.open(cap)


def test_every_error_here_is_a_sparvar_error():
    for cls in (ArrayFileError, TensorFileError, CaptureError, LayoutError, PlanConfigError, ModelError,
                ScheduleError):
        assert issubclass(cls, SparvarError)
