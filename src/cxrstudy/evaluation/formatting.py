"""Percentages for tables and prose: metric dicts with their intervals, bare fractions."""

from __future__ import annotations


def pct_plain(value: float | None) -> str:
    """A bare fraction as '95.6%' ('n/a' for None)."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def fmt_pct(m: dict | None) -> str:
    """'93.1% [90.2, 95.6]' from a metric dict."""
    if not m or m.get("value") is None:
        return "n/a"
    if m.get("ci_low") is None:
        return f"{100 * m['value']:.1f}%"
    return f"{100 * m['value']:.1f}% [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"
