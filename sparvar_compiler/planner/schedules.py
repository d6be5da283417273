"""Scale schedules: the (h, w) token grid of every scale of a VAR-style model.

A schedule is written as comma-separated grids, ``"1,2,4x3,8x6"``: a bare ``n`` is an ``n x n`` grid and
``HxW`` is ``H`` rows by ``W`` columns. Infinity names aspect ratios by height over width (its ``h_div_w``):
``"5:4"`` is a 1.25 ratio whose last grid is 70 rows by 56 columns; the inverse ratio ``"4:5"`` swaps h and w.

Every size is bounded where it is read (:mod:`sparvar_compiler.limits`): a grid side by ``MAX_GRID_SIDE``, the
tokens of a scale by ``MAX_TOKENS_PER_SCALE``, the scales by ``MAX_SCALES`` (counted before any is parsed) and
the whole key/value cache by ``MAX_KV_LEN``; every later stage allocates by these.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence

from .. import limits
from ..errors import ScheduleError
from ..limits import shown

Grid = tuple[int, int]


@dataclass(frozen=True)
class Schedule:
    """The grids of one (resolution, aspect ratio) of a model.

    Attributes
    ----------
    resolution:
        Image side in pixels for square images (1024 for Infinity's 1M-pixel schedules).
    aspect:
        Height-to-width ratio written ``"h:w"`` (``"1:1"``, ``"5:4"``, ``"4:5"``, ...).
    grids:
        ``(h, w)`` per scale, coarsest first. Tokens of a scale are numbered row-major (``y * w + x``), and the
        key/value cache of scale ``k`` holds the tokens of scales ``0..k`` in order.
    config_only:
        True where no public checkpoint uses this schedule (it comes from a model config only).
    """

    resolution: int
    aspect: str
    grids: tuple[Grid, ...]
    config_only: bool = False

    def __post_init__(self) -> None:
        check_grids(self.grids, f"schedule {self.resolution} {self.aspect}")

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @property
    def tokens(self) -> tuple[int, ...]:
        """Tokens per scale."""
        return tuple(h * w for h, w in self.grids)

    @property
    def kv_offsets(self) -> tuple[int, ...]:
        """Index of each scale's first token in the key/value cache."""
        out, acc = [], 0
        for t in self.tokens:
            out.append(acc)
            acc += t
        return tuple(out)

    @property
    def kv_lens(self) -> tuple[int, ...]:
        """Key/value length seen by the queries of each scale (cumulative tokens)."""
        return tuple(o + t for o, t in zip(self.kv_offsets, self.tokens))

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    def text(self) -> str:
        return format_schedule(self.grids)


_MAX_NUMBER_TEXT = 12  # characters of one grid side written as text: far above MAX_GRID_SIDE, far below int()'s


def _side(text: str, item: object, where: str, axis: str) -> int:
    t = text.strip()
    if not (t.isascii() and t.isdigit()):  # "²".isdigit() is True, and int("²") raises
        raise ScheduleError(f"{where}: expected a grid like '4' or '4x3', got {shown(item)}")
    if len(t) > _MAX_NUMBER_TEXT:  # int() of thousands of digits is slow, and refused past 4300
        raise ScheduleError(f"{where}: grid {axis} of {len(t)} digits is over the limit of {limits.MAX_GRID_SIDE} "
                            "(sparvar_compiler.limits.MAX_GRID_SIDE)")
    return int(t)


def parse_grid(item: object, where: str) -> Grid:
    """Parse one grid: ``4``, ``"4"``, ``"4x3"`` or ``[4, 3]``; sides and tokens within the limits."""
    if isinstance(item, bool):
        raise ScheduleError(f"{where}: expected a grid like 4, '4x3' or [4, 3], got {shown(item)}")
    if isinstance(item, int):
        h = w = item
    elif isinstance(item, str):
        parts = item.strip().lower().split("x", 2)
        if len(parts) not in (1, 2):
            raise ScheduleError(f"{where}: expected a grid like '4' or '4x3', got {shown(item)}")
        h = _side(parts[0], item, where, "height")
        w = _side(parts[-1], item, where, "width")
    elif isinstance(item, (list, tuple)) and len(item) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in item
    ):
        h, w = item
    else:
        raise ScheduleError(f"{where}: expected a grid like 4, '4x3' or [4, 3], got {shown(item)}")
    if h <= 0 or w <= 0:
        raise ScheduleError(f"{where}: grid sides must be positive, got {shown(h)}x{shown(w)}")
    limits.check_limit(h, limits.MAX_GRID_SIDE, "MAX_GRID_SIDE", f"{where}: grid height", ScheduleError)
    limits.check_limit(w, limits.MAX_GRID_SIDE, "MAX_GRID_SIDE", f"{where}: grid width", ScheduleError)
    limits.check_limit(h * w, limits.MAX_TOKENS_PER_SCALE, "MAX_TOKENS_PER_SCALE", f"{where}: tokens of grid {h}x{w}",
                       ScheduleError)
    return (h, w)


def check_grids(grids: Sequence[Grid], where: str) -> None:
    """Check already-parsed grids: the number of scales, every side and scale within the limits, and the
    key/value cache of all scales (``MAX_KV_LEN``)."""
    if not isinstance(grids, (tuple, list)):
        raise ScheduleError(f"{where}: grids must be a list of (h, w), got {shown(grids)}")
    limits.check_limit(len(grids), limits.MAX_SCALES, "MAX_SCALES", f"{where}: number of scales", ScheduleError)
    total = 0
    for i, g in enumerate(grids):
        if not (isinstance(g, (tuple, list)) and len(g) == 2):
            raise ScheduleError(f"{where}[{i}]: a grid is (h, w), got {shown(g)}")
        h, w = parse_grid(list(g), f"{where}[{i}]")
        total += h * w
    limits.check_limit(total, limits.MAX_KV_LEN, "MAX_KV_LEN", f"{where}: key/value length (tokens of all scales)",
                       ScheduleError)


def parse_schedule(spec: str | Sequence[object], where: str = "schedule") -> tuple[Grid, ...]:
    """Parse a schedule from ``"1,2,4x3"`` or a list of grids; checks that it is a real coarse-to-fine ladder
    within the limits (the number of scales is checked before any grid is parsed)."""
    items: Sequence[object]
    if isinstance(spec, str):
        limits.check_limit(spec.count(",") + 1, limits.MAX_SCALES, "MAX_SCALES", f"{where}: number of scales",
                           ScheduleError)
        items = [s for s in spec.replace(" ", "").split(",")]
    elif isinstance(spec, (list, tuple)):
        items = spec
    else:
        raise ScheduleError(f"{where}: expected a list of grids or a string like '1,2,4x3', got {shown(spec)}")
    limits.check_limit(len(items), limits.MAX_SCALES, "MAX_SCALES", f"{where}: number of scales", ScheduleError)
    grids = tuple(parse_grid(item, f"{where}[{i}]") for i, item in enumerate(items))
    if len(grids) < 2:
        raise ScheduleError(f"{where}: a schedule needs at least 2 scales, got {len(grids)}")
    for i in range(1, len(grids)):
        (ph, pw), (h, w) = grids[i - 1], grids[i]
        if h < ph or w < pw:
            raise ScheduleError(
                f"{where}[{i}]: grid {h}x{w} is smaller than the previous scale's {ph}x{pw}; "
                "scales must go from coarse to fine"
            )
    check_grids(grids, where)
    return grids


def format_schedule(grids: Sequence[Grid]) -> str:
    return ",".join(str(h) if h == w else f"{h}x{w}" for h, w in grids)


def aspect_name(h: int, w: int) -> str:
    f = Fraction(h, w)
    return f"{f.numerator}:{f.denominator}"


def parse_aspect(text: str | float, known: Sequence[str]) -> str:
    """Map ``"5:4"``, ``"1.25"`` or ``1.25`` (height over width) to a known aspect name.

    Decimals match the nearest known ratio within 1% (Infinity writes 4:3 as 1.333).
    """
    try:
        if isinstance(text, str) and ":" in text:
            a, b = text.split(":")
            value = float(a) / float(b)
        else:
            value = float(text)
    except (ValueError, TypeError, ZeroDivisionError):
        raise ScheduleError(
            f"aspect ratio {shown(text)} is not 'h:w' or a number; known: {', '.join(known)}"
        ) from None
    for name in known:
        a, b = name.split(":")
        if abs(value / (int(a) / int(b)) - 1.0) < 0.01:
            return name
    raise ScheduleError(f"unknown aspect ratio {shown(text)} (height:width); known: {', '.join(known)}")


# Infinity at 1M pixels, height over width (SPEC.md). Inverse ratios swap h and w.
_INFINITY_1M = {
    "1:1": "1,2,4,6,8,12,16,20,24,32,40,48,64",
    "5:4": "1,2,3,5x4,10x8,15x12,20x16,25x20,30x24,35x28,45x36,55x44,70x56",
    "4:3": "1,2,4x3,8x6,12x9,16x12,20x15,24x18,28x21,36x27,48x36,60x45,72x54",
    "3:2": "1,2,3x2,6x4,9x6,15x10,21x14,27x18,33x22,39x26,48x32,63x42,78x52",
    "7:4": "1,2,3,7x4,11x6,14x8,21x12,28x16,35x20,42x24,56x32,70x40,84x48",
    "2:1": "1,2,4x2,6x3,10x5,16x8,22x11,30x15,38x19,46x23,60x30,74x37,90x45",
    "5:2": "1,2,5x2,10x4,15x6,20x8,25x10,30x12,40x16,50x20,65x26,80x32,100x40",
    "3:1": "1,2,6x2,9x3,15x5,21x7,27x9,36x12,45x15,54x18,72x24,90x30,111x37",
}

# Lower Infinity resolutions use a prefix of the 1M schedule: (pixels per side, scales kept, name).
INFINITY_RESOLUTIONS = {1024: 13, 768: 12, 512: 10, 256: 7}
INFINITY_RESOLUTION_NAMES = {"1M": 1024, "0.60M": 768, "0.6M": 768, "0.25M": 512, "0.06M": 256}

VAR_SCHEDULES = {
    256: ("1,2,3,4,5,6,8,10,13,16", False),
    512: ("1,2,3,4,6,9,13,18,24,32", False),
    1024: ("1,2,3,4,5,7,9,12,16,21,27,36,48,64", True),
}


def infinity_schedules() -> tuple[Schedule, ...]:
    """Every Infinity schedule: 15 aspect ratios, each at 1M pixels and the 0.60M/0.25M/0.06M prefixes."""
    out = []
    for name, text in _INFINITY_1M.items():
        grids = parse_schedule(text, f"infinity {name}")
        variants = [(name, grids)]
        if name != "1:1":
            a, b = name.split(":")
            variants.append((f"{b}:{a}", tuple((w, h) for h, w in grids)))
        for aspect, g in variants:
            for res, n in INFINITY_RESOLUTIONS.items():
                out.append(Schedule(resolution=res, aspect=aspect, grids=g[:n]))
    return tuple(out)


def var_schedules(resolutions: Iterable[int]) -> tuple[Schedule, ...]:
    out = []
    for res in resolutions:
        text, config_only = VAR_SCHEDULES[res]
        out.append(Schedule(res, "1:1", parse_schedule(text, f"var {res}"), config_only))
    return tuple(out)


def parse_resolution(value: str | int, known: Sequence[int]) -> int:
    """``1024``, ``"1024"`` or an Infinity pixel-count name (``"1M"``, ``"0.25M"``)."""
    text = value.strip() if isinstance(value, str) else shown(value)
    res: int | None = None
    if text in INFINITY_RESOLUTION_NAMES:
        res = INFINITY_RESOLUTION_NAMES[text]
    elif text.isascii() and text.isdigit() and len(text) <= _MAX_NUMBER_TEXT:
        res = int(text)
    if res is None or res not in known:
        names = ", ".join(str(k) for k in sorted(known))
        raise ScheduleError(f"unknown resolution {shown(value)}; this model has: {names}")
    return res
