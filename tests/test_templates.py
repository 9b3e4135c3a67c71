"""Jinja2 templates: found as package data, rendered from a results dict built by the real code."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

import numpy as np
import pandas as pd
import pytest

from cxrstudy import config
from cxrstudy.evaluation.formatting import fmt_pct
from cxrstudy.evaluation.shortcut_summary import assemble_shortcut_checks
from cxrstudy.reporting import pages, templates
from cxrstudy.reporting.results import build_results

TEMPLATES = ("index.html.j2", "model_card.md.j2", "claim_checklist.md.j2", "readme_results.md.j2")
TAG = re.compile(r"</?[a-zA-Z][^>]*>")


def _metric(value, lo, hi):
    return {"value": value, "ci_low": lo, "ci_high": hi, "n_boot": 50}


def _profile(root):
    """Four configurations (shallow/deep, decomposition off/on) of the paper's task in two folds, 20 patient groups
    scored out of fold."""
    rng = np.random.default_rng(0)
    labels = np.array(["covid", "normal"] * 20)
    for sc in ("shallow", "deep"):
        for dec in (False, True):
            for fold in (0, 1):
                run_id = f"covid_vs_normal__efficientnet_lite0__{sc}__{'decomp' if dec else 'nodecomp'}__seed0__fold{fold}"
                d = root / "runs" / run_id
                d.mkdir(parents=True)
                rows = []
                for split in ("val", "test"):
                    right = rng.random(len(labels)) < (0.9 if sc == "shallow" else 0.8)
                    p = np.where((labels == "covid") == right, 0.8, 0.3)
                    rows += [
                        {"image": f"{split}{fold if split == 'val' else ''}_{i}.png", "split": split, "label": labels[i],
                         "source": "s/x", "patient_group": f"{split}{fold if split == 'val' else ''}g{i // 2}",
                         "prob_covid": p[i], "prob_normal": 1 - p[i], "pred": "covid" if p[i] > 0.5 else "normal"}
                        for i in range(len(labels))
                        if split == "val" or (i // 2) % 2 == fold
                    ]
                pd.DataFrame(rows).to_csv(d / "predictions.csv", index=False)
                info = {"run_id": run_id, "task": "covid_vs_normal", "backbone": "efficientnet_lite0", "scenario": sc,
                        "decomposition": dec, "seed": 0, "fold": fold, "folds": 2, "classes": ["covid", "normal"],
                        "image_size": 160, "train_seconds": 12.5}
                (d / "run.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results.json content from build_results on saved runs, with every shortcut check filled in."""
    pdir = _profile(tmp_path_factory.mktemp("prof") / "default")
    manifest = pd.DataFrame(
        {"image": list("abcd"), "label": ["covid", "normal", "normal", "covid"], "split": ["train", "test", "val", "test"],
         "source_name": ["mhh", "nih", "nih", "actualmed"], "patient_group": ["p1", "p2", "p2", "p3"]}
    )
    checks = assemble_shortcut_checks(
        source_identification={"accuracy": 0.71, "balanced_accuracy": 0.53, "majority_baseline": 0.46, "n": 1423},
        masking={
            "unmasked": {"accuracy": _metric(0.936, 0.904, 0.965), "n_test": 203},
            "masked_lungs": {"accuracy": _metric(0.916, 0.88, 0.951), "n_test": 203},
            "lungs_only": {"accuracy": _metric(0.936, 0.897, 0.97), "n_test": 203},
        },
        leave_one_source_out=[
            {"held_out": "actualmed", "n": 40, "labels": ["covid", "normal"], "accuracy": _metric(0.6, 0.447, 0.75)},
            {"held_out": "nih", "n": 443, "labels": ["normal"], "accuracy": _metric(0.034, 0.016, 0.055)},
        ],
        same_hospital={"source": "actualmed", "n": 40, "probe": {"accuracy": _metric(0.875, 0.757, 0.974)}},
    )
    head = "covid_vs_normal__efficientnet_lite0__shallow__nodecomp__seed0"  # a configuration id
    card = [
        {"run_id": run, "variant": "baseline", "task": "covid_vs_normal", "metric": metric, "value": value,
         "ci_low": None if value is None else value - 0.1, "ci_high": None if value is None else value + 0.05,
         "n": 40, "method": method, **({"note": "no pneumonia class"} if value is None else {})}
        for run in (head, head.replace("shallow", "deep"), head.replace("nodecomp", "decomp"),
                    head.replace("shallow__nodecomp", "deep__decomp"))
        for metric, value, method in (("ieee8023_covid_vs_pneumonia_auc", 0.75, "probe"),
                                      ("nih_pneumonia_vs_normal_auc", None, "model"),
                                      ("paper_task_accuracy", 0.95, "model"))
    ]
    return build_results(
        pdir, manifest, shortcut_checks=checks, n_bootstrap=50, excluded=pd.DataFrame({"reason": ["lateral"]}),
        params={"max_per_class": 0}, scorecard=card, write=False,
    )


def test_templates_are_package_data():
    names = sorted(p.name for p in templates.TEMPLATE_DIR.glob("*.j2"))
    assert sorted(TEMPLATES) == names
    globs = tomllib.loads((config.ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cxrstudy"]
    for name in names:
        assert any(fnmatch.fnmatch(f"reporting/templates/{name}", g) for g in globs), f"{name} is not in package-data"


def test_only_html_templates_autoescape():
    env = templates.environment()
    assert env.from_string("{{ x }}").render(x="<b>") == "&lt;b&gt;"  # strings: the safe default
    assert env.autoescape("index.html.j2") is True
    assert env.autoescape("model_card.md.j2") is False


def test_model_card(results):
    card = pages.model_card(results)
    head = results["headline"]
    best = next(r for r in results["configurations"] if r["run_id"] == head["run_id"])
    assert card.startswith(f"# Model card: {head['run_id']}\n\n## Model\n- Task: covid_vs_normal; classes: covid, normal.\n")
    assert f"scenario {best['scenario']}, class decomposition" in card and "2 fold models" in card
    assert "used together as an ensemble (mean probability), training 25.0 s in all." in card
    assert f"- Accuracy {fmt_pct(best['test']['accuracy'])}; balanced accuracy" in card
    assert f"Calibration: ECE {best['test']['ece']:.3f}, Brier {best['test']['brier']:.3f}." in card
    assert "(actualmed, mhh, nih)" in card and "**Not for clinical use.**" in card
    assert f"{config.PAPER_CITATION}: 94.17%; {config.DETRAC_CITATION}: 93.1%." in card
    bullets = card.split("## Limitations and shortcut checks\n")[1].splitlines()
    assert bullets == [f"- {s}" for s in results["verdict"][1:]] and card.endswith(".\n")
    assert f"on pooled inner-validation accuracy ({100 * best['val_accuracy']:.1f}%), never on held-out films." in card
    goals = card.split("## Confound-free scorecard (out of fold, the held-out hospital by the ensemble; 95% CI)\n")[1]
    goals = goals.split("\n\n")[0]
    assert goals.splitlines()[0] == (
        "- S1 ieee8023_covid_vs_pneumonia_auc: 75.0% [65.0, 80.0] (linear probe on the out-of-fold features), goal >= "
        "80.0%: undetermined."
    )
    assert "S4" not in goals  # a binary model has no pneumonia class: the NIH pneumonia goal does not apply
    assert len(goals.splitlines()) == 3 and "not free of ImageNet" not in card and "S5" not in card


def test_model_card_without_a_headline_run():
    card = pages.model_card({"headline": {"task": "covid_vs_normal", "text": "No transfer run."}, "verdict": ["x"]})
    assert card.startswith("# Model card: no run\n") and "classes: n/a." in card and "- Accuracy" not in card


def test_claim_checklist(results):
    text = pages.claim_checklist({**results, "headline": {**results["headline"], "text": "a | b"}})
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| item")]
    assert len(rows) == 12 and all(line.count(" | ") == 1 for line in rows)
    assert "| Headline | a / b |" in rows
    assert "Source identification accuracy 71.0%" in text and "in-lung saliency share n/a" in text
    assert "scenarios ['deep', 'shallow']" in text and "1 candidate files excluded (reasons: {'lateral': 1})" in text
    assert "from 50 class-stratified patient-group bootstrap resamples" in text and "Patient-grouped cross-validation (2 folds" in text
    assert "Not part of the study" not in text and "Actualmed" in text


def test_index_and_readme_from_results(tmp_path, results):
    (tmp_path / "results.json").write_text(json.dumps(results))
    record = {"profile": "default", "status": "ok", "steps": [], "ended": "2026-11-30T10:00:00+00:00",
              "device": {"resolved": "cpu", "cpu_count": 2}, "git": {"commit": "0123456789abcdef"}}
    page = pages.write_index(tmp_path, record).read_text()
    assert page.count("<tr><td>covid_vs_normal</td>") == 4 and "Verdict" in page and "<h2>Shortcut checks</h2>" in page
    assert "nih: 3.4 <small>[1.6, 5.5]</small>" in page and "<td>unmasked</td><td>93.6 <small>[90.4, 96.5]</small>" in page
    assert "&amp; Mikhelev 2021, J. Phys.: Conf. Ser. 1801 012010 (reported, one split)</td><td>94.17</td>" in page
    assert "<td>40 / 20</td>" in page  # every film out of fold: 40 films of 20 patients
    md = pages.readme_results(results, record)
    table = [line for line in md.splitlines() if line.startswith("|")]
    # run table (2 + 4 configurations + 2 reported), scorecard (2 + the headline's configuration)
    assert len(table) == 2 + 4 + 2 + 2 + 1 and not any(TAG.search(line) for line in table)
    assert table[6] == f"| {config.PAPER_CITATION} | reported (one split) | | | | | 94.17 | | | | | |"
    assert "**Confound-free scorecard**" in md and "<h2>Confound-free scorecard" in page
    head = results["headline"]["run_id"]
    assert "accuracy % (DeTraC hard rule)</th>" in page and "inner-validation accuracy %</th>" in page
    [row] = pages.readme_scorecard_rows(results)
    best = results["headline"]
    name = f"{best['scenario']} {'decomp' if best['decomposition'] else 'nodecomp'} (covid_vs_normal)"
    assert (row["run"], row["seeds"]) == (name, "out of fold")
    assert [s["run_ids"] for s in results["scorecard_summary"] if s["run_ids"] == [head]] == [[head]]
    assert md.startswith("Latest `default` run: 2026-11-30, commit `0123456789`, cpu (2 CPU cores; ), 0.0 min")
    assert "**Verdict.**" in md and results["headline"]["text"] in md


def test_model_card_names_imagenet_subclasses_of_the_scratch_control(results):
    configs = [*results["configurations"], {**results["configurations"][0], "scenario": "scratch", "decomposition": True}]
    card = pages.model_card({**results, "configurations": configs})
    assert "The scratch control with class decomposition (covid_vs_normal) is not free of ImageNet" in card
