"""The HTML pages' templates (``qc/templates/*.html.j2``, Jinja2): one environment for
every page, autoescaping every value (tables and scripts built as HTML are inserted with
``|safe`` where the template says so)."""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def _environment():
    import jinja2

    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def render(name: str, **context) -> str:
    """The template ``qc/templates/<name>`` rendered with ``context``."""
    text = (resources.files("qctfea.qc") / "templates" / name).read_text(encoding="utf-8")
    return _environment().from_string(text).render(**context)
