"""The software and hardware a trial ran in, and which differences make a tuning record unusable.

A record is reused only where it was measured under comparable conditions. *Hard* mismatches refuse the
record: another GPU (name, arch or SM count), another major version of Triton, TVM or CUDA, another
major.minor of torch. *Soft* mismatches (other minor or patch versions, another driver, sparvar or Python
version) only warn with :class:`SoftMismatchWarning`. A field missing on either side (no GPU on a build host,
no TVM on a GPU host) is not compared.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .. import __version__

#: Environment fields and how a difference in each is judged.
#: ``exact``: any difference is hard. ``major``: the breaking component (the major, or the minor of a 0.x
#: release, as semver and TVM's release history have it) is hard, the rest soft. ``minor``: major.minor hard.
#: ``soft``: any difference is soft.
RULES: dict[str, str] = {
    "gpu_name": "exact",
    "gpu_arch": "exact",
    "sm_count": "exact",
    "cuda": "major",
    "triton": "major",
    "tvm": "major",
    # Our kernels are compiled by Triton/TVM and launched through the driver: torch only allocates and
    # launches, so another torch (e.g. the CPU build on the host that emits a module) does not void a record.
    "torch": "soft",
    "driver": "soft",
    "sparvar": "soft",
    "python": "soft",
}

_PACKAGES = {"torch": ("torch",), "triton": ("triton",), "tvm": ("apache-tvm", "tvm")}


class SoftMismatchWarning(UserWarning):
    """A tuning record is used although it was measured under a slightly different environment."""


@dataclass(frozen=True)
class Mismatch:
    """One differing field: ``field`` is an environment field or ``target.<name|arch|sm_count>``."""

    field: str
    recorded: Any
    current: Any

    def __str__(self) -> str:
        return f"{self.field}: recorded {self.recorded!r}, current {self.current!r}"


def _package_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def parse_driver_version(text: str) -> str | None:
    """The driver version in ``/proc/driver/nvidia/version`` (proprietary or open kernel module)."""
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]*)", text)
    return m.group(1) if m else None


def _driver_version() -> str | None:
    # The kernel module reports it without loading any CUDA library.
    try:
        return parse_driver_version(Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        return None


def _gpu(device: int) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {}
    info: dict[str, Any] = {"cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_arch=f"sm_{props.major}{props.minor}",
                    sm_count=props.multi_processor_count)
    return info


def collect_environment(probe_gpu: bool = True, device: int = 0) -> dict[str, Any]:
    """Versions and GPU of this process, as recorded with every trial.

    Parameters
    ----------
    probe_gpu:
        Import torch to read the CUDA version torch was built with and the GPU ``device`` (name, arch, SM
        count). Off, those fields are None and torch is not imported.
    device:
        CUDA device index to describe.

    Returns
    -------
    dict
        Every key of :data:`RULES`; a value is None where it does not apply (no GPU, TVM not installed).
        Library versions come from package metadata, so TVM is never imported.
    """
    env: dict[str, Any] = dict.fromkeys(RULES)
    env.update({k: _package_version(v) for k, v in _PACKAGES.items()})
    env.update(driver=_driver_version(), sparvar=__version__, python=platform.python_version())
    if probe_gpu:
        env.update(_gpu(device))
    return env


def target_of(environment: Mapping[str, Any]) -> dict[str, Any]:
    """The arch and SM count of the GPU an environment describes (the name vocabularies differ: a target is
    named from the registry, ``"h100"``, an environment by the driver, ``"NVIDIA H100 80GB HBM3"``)."""
    out = {"arch": environment.get("gpu_arch"), "sm_count": environment.get("sm_count")}
    return {k: v for k, v in out.items() if v is not None}


def _release(version: Any) -> tuple[int, ...] | None:
    m = re.match(r"\d+(?:\.\d+)*", str(version))
    return tuple(int(p) for p in m.group(0).split(".")) if m else None


def _breaking(release: tuple[int, ...], rule: str) -> tuple[int, ...]:
    if rule == "minor":
        return (release + (0,))[:2]
    return (release + (0,))[:2] if release[0] == 0 else release[:1]


def _judge(rule: str, recorded: Any, current: Any) -> str:
    """``"hard"`` or ``"soft"`` for two differing values."""
    if rule in ("exact", "soft"):
        return "hard" if rule == "exact" else "soft"
    a, b = _release(recorded), _release(current)
    if a is None or b is None:  # unparseable versions: cannot tell how far apart, so refuse
        return "hard"
    return "hard" if _breaking(a, rule) != _breaking(b, rule) else "soft"


def classify_mismatch(recorded: Mapping[str, Any] | None, current: Mapping[str, Any] | None,
                      target_recorded: Mapping[str, Any] | None = None,
                      target_current: Mapping[str, Any] | None = None) -> tuple[list[Mismatch], list[Mismatch]]:
    """Split the differences between a record's environment and target and the current ones.

    Parameters
    ----------
    recorded, current:
        Environments as :func:`collect_environment` returns them; fields outside :data:`RULES` are ignored.
    target_recorded, target_current:
        Target descriptions (``name``, ``arch``, ``sm_count``); only fields present in both are compared, and
        every difference is hard.

    Returns
    -------
    (hard, soft)
        Lists of :class:`Mismatch`.
    """
    hard: list[Mismatch] = []
    soft: list[Mismatch] = []
    recorded, current = recorded or {}, current or {}
    for name, rule in RULES.items():
        a, b = recorded.get(name), current.get(name)
        if a is None or b is None or a == b:
            continue
        (hard if _judge(rule, a, b) == "hard" else soft).append(Mismatch(name, a, b))
    if target_recorded is not None and target_current is not None:
        for name in ("name", "arch", "sm_count"):
            a, b = target_recorded.get(name), target_current.get(name)
            if a is not None and b is not None and a != b:
                hard.append(Mismatch(f"target.{name}", a, b))
    return hard, soft

