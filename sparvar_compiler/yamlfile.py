"""Reading a small YAML document (a model description, a plan config) from a file nobody vouches for.

``yaml.safe_load`` builds no objects but plain ones, which is what makes YAML safe to read; it is not what
makes it cheap. Four things are bounded here before anything else looks at the data:

* the file's size (:data:`~sparvar_compiler.limits.MAX_YAML_BYTES`), read with a cap, so ``/dev/zero`` or a
  10 GB file costs one read of the limit;
* the encoding: UTF-8 (a byte-order mark is allowed); anything else is one error naming the offset;
* aliases: ``safe_load`` shares an aliased node rather than copying it, so a 1 KiB "billion laughs" file loads
  fast, and then explodes in whatever walks it (``repr`` in an error message, ``json.dumps``, ``yaml.dump``).
  The node graph is counted as if every alias were expanded (:data:`~sparvar_compiler.limits.MAX_YAML_NODES`)
  before anything is constructed; a recursive alias (``&a [*a]``) is refused by the depth limit;
* nesting (:data:`~sparvar_compiler.limits.MAX_YAML_DEPTH`), and integers too long for ``int()`` (Python
  refuses more than 4300 digits with a ValueError, which would be a traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Type

import yaml

from .limits import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES


class _TooBig(Exception):
    """The node graph is too deep or expands to too many nodes (message: which)."""


def _expanded_nodes(node: yaml.Node, depth: int, memo: dict[int, int]) -> int:
    """Nodes of ``node`` with every alias expanded; shared nodes are counted once per use but walked once."""
    if depth > MAX_YAML_DEPTH:
        raise _TooBig(f"nested more than {MAX_YAML_DEPTH} levels deep (sparvar_compiler.limits.MAX_YAML_DEPTH), "
                      "or an alias refers to itself")
    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_nodes(c, depth + 1, memo) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_nodes(k, depth + 1, memo) + _expanded_nodes(v, depth + 1, memo) for k, v in node.value)
    else:
        n = 1
    memo[key] = n
    return n


def parse_yaml(text: str, where: str, error: Type[Exception]) -> Any:
    """The document of ``text`` (``None`` if empty), or ``error`` naming ``where`` and the problem."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        total = _expanded_nodes(node, 0, {})
        if total > MAX_YAML_NODES:
            raise _TooBig(f"expands to {total} nodes once its aliases are resolved, over the limit of "
                          f"{MAX_YAML_NODES} (sparvar_compiler.limits.MAX_YAML_NODES)")
        return loader.construct_document(node)
    except _TooBig as e:
        raise error(f"{where}: YAML document {e}") from None
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise error(f"{where}: YAML document nested more than {MAX_YAML_DEPTH} levels deep "
                    "(sparvar_compiler.limits.MAX_YAML_DEPTH)") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise error(f"{where}: YAML holds a value Python cannot convert ({e})") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, error: Type[Exception], what: str = "YAML file") -> Any:
    """Read and parse the YAML file ``path`` within the limits above.

    Parameters
    ----------
    path:
        The file. It must exist and be a regular file.
    error:
        The :class:`~sparvar_compiler.errors.SparvarError` subclass to raise (``ModelError`` for a model
        description, ``PlanConfigError`` for a plan config).
    what:
        How the message names the file when it does not exist (``"model file"``, ``"plan config"``).

    Raises
    ------
    error
        One line naming the file and the problem: missing, unreadable, over ``MAX_YAML_BYTES``, not UTF-8, not
        YAML, too deep, or expanding to too many nodes.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {str(p)!r} does not exist")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise error(f"{p}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_YAML_BYTES:
        size = max(p.stat().st_size, len(raw))
        raise error(f"{p}: {what} size {size} bytes is over the limit of {MAX_YAML_BYTES} "
                    "(sparvar_compiler.limits.MAX_YAML_BYTES)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return parse_yaml(text, str(p), error)
