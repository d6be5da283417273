"""The one template renderer: jinja2 with StrictUndefined, templates loaded from the package.

A misspelled or missing variable fails the render instead of producing empty text. jinja2 is imported on the first
render, not with the backends: loading and verifying a module reads their launch rules, never their templates,
and must run with torch, numpy and pyyaml alone.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..resources import data_dir

if TYPE_CHECKING:  # pragma: no cover
    import jinja2


class TemplateError(RuntimeError):
    """A template failed to render (undefined variable, syntax error, missing template)."""


@lru_cache(maxsize=1)
def environment() -> "jinja2.Environment":
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(name: str, **params: Any) -> str:
    """Render ``templates/<name>`` with ``params``; every variable the template uses must be given."""
    import jinja2

    try:
        return environment().get_template(name).render(**params)
    except jinja2.TemplateNotFound:
        raise TemplateError(f"template {name!r} not found in sparvar_compiler/templates") from None
    except jinja2.UndefinedError as e:
        raise TemplateError(f"template {name!r}: {e.message}") from None
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template {name!r} line {e.lineno}: {e.message}") from None
