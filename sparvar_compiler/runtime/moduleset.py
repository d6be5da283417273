"""A loaded module set: one runtime module per (resolution, aspect ratio), picked by a scale's grid.

    import sparvar_compiler.runtime as rt
    modules = rt.load("out/infinity-8b-all-h100")          # a set directory: a ModuleSet
    m = modules.member_for(grids)                            # the schedule a call belongs to
    o = m.attention(q, k, v, scale_index, layer_index)

Members share kernels on disk (see :mod:`sparvar_compiler.emit.moduleset`); in memory each member loads its own.
Loading every member costs time and device memory, so ``members=`` limits what is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..codegen.spec import KernelInputError
from ..emit.manifest import ModuleError
from .module import SparvarModule


class ModuleSet:
    """Runtime modules of one model for several schedules. Use :func:`sparvar_compiler.runtime.load`.

    Attributes
    ----------
    manifest:
        The set manifest (model, target, members, shared pool).
    members:
        ``{member name: SparvarModule}`` of the loaded members (e.g. ``"1024-4x3"``).
    """

    def __init__(self, directory: str | Path, device: str | torch.device | None = None,
                 members: Iterable[str] | None = None):
        from ..emit.manifest import verify_set

        self.directory = Path(directory)
        # The set's digest and schema, its tree, and every member (digest, schema, files) - checked once; the
        # members then load from the manifests checked here.
        verified: dict[str, dict] = {}
        self.manifest = verify_set(self.directory, on_member=lambda name, m: verified.__setitem__(name, m))
        names = [m["name"] for m in self.manifest["members"]]
        wanted = names if members is None else list(members)
        unknown = sorted(set(wanted) - set(names), key=str)
        if unknown:
            raise ModuleError(f"module set {self.directory} has no member {unknown[0]} (members: {', '.join(names)})")
        self.members: dict[str, SparvarModule] = {
            n: SparvarModule(self.directory / n, device, _verified=verified[n]) for n in wanted}
        self._grids = {m["name"]: tuple(tuple(g) for g in m["grids"]) for m in self.manifest["members"]
                       if m["name"] in self.members}

    @property
    def device(self) -> torch.device:
        return next(iter(self.members.values())).device

    def member(self, name: str) -> SparvarModule:
        """The member called ``name`` (``"<resolution>-<h>x<w>"``)."""
        try:
            return self.members[name]
        except KeyError:
            raise KernelInputError(f"no loaded member {name!r}; loaded: {', '.join(self.members)}") from None

    def member_for(self, grids: Sequence[Sequence[int]]) -> SparvarModule:
        """The member whose schedule is ``grids`` (``(h, w)`` per scale, coarsest first; a prefix of a member's
        schedule, such as the scales generated so far, picks it when only one member has that prefix)."""
        want = tuple((int(g[-2]), int(g[-1])) for g in grids)  # accepts Infinity's (t, h, w) too
        exact = [n for n, g in self._grids.items() if g == want]
        if exact:
            return self.members[exact[0]]
        prefix = [n for n, g in self._grids.items() if g[:len(want)] == want]
        if len(prefix) == 1:
            return self.members[prefix[0]]
        if not prefix:
            raise KernelInputError(f"no member of this module set has the schedule {list(want)}; members: "
                                   + "; ".join(f"{n} {list(g)[-1]}" for n, g in self._grids.items()))
        raise KernelInputError(f"the schedule {list(want)} is a prefix of several members' ({', '.join(prefix)}); "
                               f"pass the whole schedule")

    def member_for_lengths(self, lengths: Sequence[tuple[int, int]]) -> SparvarModule:
        """The member whose scales have these ``(tokens, kv_len)`` in order (what an attention hook sees)."""
        want = tuple((int(a), int(b)) for a, b in lengths)
        hits = [n for n, m in self.members.items() if tuple(m.scale_lengths()[:len(want)]) == want]
        if len(hits) == 1:
            return self.members[hits[0]]
        if not hits:
            raise KernelInputError(f"no member of this module set has scales of (tokens, kv_len) {list(want)}")
        raise KernelInputError(f"scales of (tokens, kv_len) {list(want)} fit several members ({', '.join(hits)})")

    def __iter__(self):
        return iter(self.members.values())

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return f"<ModuleSet {self.manifest['model']['name']} for {self.manifest['target']['name']}: " \
               f"{', '.join(self.members)}>"
