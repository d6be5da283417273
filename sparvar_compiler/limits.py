"""Every size limit on input, in one place, enforced before anything is allocated.

A compiler reads model files, plan configs, schedules, tuning exports, capture tensors and emitted modules that
may come from anyone. Each of those states sizes (a grid side, a window count, an array shape, a nesting depth)
that decide how much memory the next step takes; each is checked against the limit here first, and a value over
it is an input error naming the field, never a MemoryError or a killed process.

The limits are far above anything a real model needs (Infinity-8B at 1024 px: 64x64 grids, 13 scales, 10521
tokens of KV cache) and far below what would exhaust a machine.
"""

from __future__ import annotations

from typing import Any, Type

# ------------------------------------------------------------------------------------------------ schedules
MAX_GRID_SIDE = 512            # h or w of one scale (Infinity's largest: 111)
MAX_TOKENS_PER_SCALE = 65_536  # h * w of one scale (Infinity's largest: 4096)
MAX_SCALES = 64                # scales of one schedule (Infinity: 13)
MAX_KV_LEN = 262_144           # tokens of all scales together (Infinity 1024 px: 10521-11269)
MAX_SCHEDULES = 512            # schedules of one model description

# ------------------------------------------------------------------------------------------------ models and plans
MAX_DEPTH = 1_024              # transformer layers (Infinity-20B: 58)
MAX_HEADS = 1_024
MAX_HEAD_DIM = 1_024
MAX_WIDTH = 1 << 20
MAX_GROUP_SIZE = 65_536        # CS4A query group (default 192)
MAX_KEY_TILE = 4_096           # CS4A key tile (default 112)
MAX_WINDOW = 4_096             # a CSLA window side (also a CS4A band window)
MAX_WINDOW_COUNT = MAX_SCALES  # entries of a window list (one per key scale)
MAX_DCSLA_BLOCK = 256          # a D-CSLA query/key block side (default 64; the largest kernel block)
MAX_TABLE_ELEMENTS = 1 << 28   # entries of one static CS4A table or per-head statistics row set derived from a
                               # plan (groups x capacity, groups x kv_len); Infinity-8B 1024 px: 22 x 2128
MAX_BATCH = 4_096              # the batch kernels are tuned at
MAX_NAME_LENGTH = 128          # model names, member names
NAME_PATTERN = r"[A-Za-z0-9._-]+"  # model names become file names: nothing that walks out of a directory

# ------------------------------------------------------------------------------------------------ files
MAX_YAML_BYTES = 1 << 20           # a model description or plan config
MAX_YAML_NODES = 1 << 20           # YAML nodes once aliases are expanded (a "billion laughs" file is 1 KiB)
MAX_YAML_DEPTH = 64                # nesting of a YAML document
MAX_JSON_BYTES = 256 << 20         # a tuning export or a bundle's results
MAX_MANIFEST_BYTES = 64 << 20      # a module's manifest.json
MAX_JSON_DEPTH = 64                # nesting of any JSON document we read
MAX_JSON_NUMBER_DIGITS = 64        # digits of one JSON number (Python's int() of a huge literal is quadratic)
MAX_ARRAY_BYTES = 8 << 30          # one array read from npy/npz/safetensors, from its header, before reading
MAX_ARRAY_ELEMENTS = 1 << 31
MAX_ARRAY_DIMS = 32                # dimensions of one array (numpy's own maximum is 64)
MAX_ARRAYS_PER_FILE = 4_096
MAX_NPY_HEADER_BYTES = 10_000      # an npy header (numpy's own default limit)
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20  # the JSON header of a .safetensors file (the format's own limit)
MAX_LAYOUT_HEADER_BYTES = 4_096    # the JSON header member of a block layout .npz
MAX_MODULE_FILES = 100_000         # files listed by one module manifest
MAX_KERNEL_GRID = (2 ** 31 - 1, 65_535, 65_535)  # CUDA's launch limits
MAX_THREADS_PER_BLOCK = 1_024


def check_limit(value: int, limit: int, limit_name: str, what: str, error: Type[Exception]) -> int:
    """Return ``value``, or raise ``error`` naming ``what`` (the field and where it was read), the value and the
    limit, when ``value > limit``.

    Callers check a size here *before* allocating anything sized by it, so the message is the only cost of a
    hostile value: ``plan.yaml: 'group_size' 100000000 is over the limit of 65536
    (sparvar_compiler.limits.MAX_GROUP_SIZE)``.
    """
    if value > limit:
        raise error(f"{what} {shown(value)} is over the limit of {limit} (sparvar_compiler.limits.{limit_name})")
    return value


def shown(value: Any, width: int = 80) -> str:
    """A short ``repr`` for an error message: a hostile value (a list of a million entries, a YAML alias bomb
    that expands to 10^9 nodes) must not make the message itself huge."""
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"  # repr() of a 5000-digit int raises ValueError
    r = reprlib.Repr()
    r.maxstring = r.maxother = width
    try:
        return r.repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__}>"


# ---------------------------------------------------------------------------------------- kernel launches, timings
MAX_PROGRAMS_PER_SM = 64       # programs of a persistent launch, per SM of the target (the tuner tries 1 and 2)
PEAK_MARGIN = 2.0              # the timing floor assumes this many times the vendor's peak rates, so that it can
                               # never refuse a real measurement (planner/gpus.py holds the peaks)
MIN_KERNEL_MS = 1e-4           # 100 ns: no kernel launch completes faster (launch latency alone is over 1 us)

# ------------------------------------------------------------------------------------------------ runtime modules
MAX_MODULE_FILE_BYTES = 1 << 30    # one file of a module (a cubin, an npz); Infinity-8B's largest is < 1 MB
MAX_MODULE_TREE_DEPTH = 16         # folders inside a module directory (an emitted one has 1)
MAX_SET_MEMBERS = MAX_SCHEDULES    # members of a module set (Infinity: 15 aspect ratios)
MAX_DIGEST_FILE_BYTES = 4_096      # manifest.sha256 / moduleset.sha256: one line
