"""Jinja2 templates of the written reports: index.html, model card, CLAIM checklist, README results block.

Templates are package data in this folder (``*.j2``); HTML templates (``*.html.j2``) are autoescaped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).resolve().parent


def percent(value: float, digits: int = 1) -> str:
    """A fraction as a percentage number without the sign: ``percent(0.9417, 2) == '94.17'``."""
    return f"{100 * value:.{digits}f}"


def fixed(value: float, digits: int) -> str:
    """A number with a fixed count of decimals."""
    return f"{value:.{digits}f}"


def environment(filters: dict[str, Callable] | None = None) -> jinja2.Environment:
    """The templates' environment: strict undefined values, block-trimmed whitespace, HTML autoescaping."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update({"percent": percent, "fixed": fixed, **(filters or {})})
    return env


def render(name: str, filters: dict[str, Callable] | None = None, **context: Any) -> str:
    """Render the template ``name`` (a file in this folder) with ``context``; ``filters`` adds Jinja filters."""
    return environment(filters).get_template(name).render(**context)
