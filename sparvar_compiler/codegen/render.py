"""The one template renderer: jinja2 with StrictUndefined, templates loaded from the package.

A misspelled or missing variable fails the render instead of producing empty text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2

from ..resources import data_dir


class TemplateError(RuntimeError):
    """A template failed to render (undefined variable, syntax error, missing template)."""


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
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
    try:
        return environment().get_template(name).render(**params)
    except jinja2.TemplateNotFound:
        raise TemplateError(f"template {name!r} not found in sparvar_compiler/templates") from None
    except jinja2.UndefinedError as e:
        raise TemplateError(f"template {name!r}: {e.message}") from None
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template {name!r} line {e.lineno}: {e.message}") from None
