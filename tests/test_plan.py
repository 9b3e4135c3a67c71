"""The analysis plan (params/plan.yaml: profiles, selection, goals, its record in results.json), worst-group accuracy
and the per-variant verdict."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrstudy import pipeline, plan
from cxrstudy.evaluation import scorecard
from cxrstudy.evaluation.groups import worst_group_accuracy
from cxrstudy.evaluation.variant_verdict import compare_intervals, plan_sentences, variant_sentences
from cxrstudy.runspec import RunSpec


def test_plan_is_what_the_default_profile_notebook_05_and_the_scorecard_use():
    p = plan.load_plan()
    assert plan.goals(p) == scorecard.goals_table()  # one set of goals
    assert plan.selection(p) == {"task": "covid_normal_pneumonia", "scenario": "deep", "max_drop": 0.05,
                                 "contrast": "view_matched"}
    with pytest.raises(ValueError, match="selection_max_drop=0.1 differs from plan.yaml"):
        plan.selection(p, max_drop=0.1)
    assert plan.selection(p, task=None, max_drop=0.05)["task"] == "covid_normal_pneumonia"
    # the default profile runs exactly the plan's deep variants (decomposition off), DFR runs included
    ran: dict[str, set[str]] = {}
    for run_id in pipeline.expected_run_ids(pipeline.load_profile("default")):
        spec = next(s for s in _specs_of("default") if s.run_id == run_id)
        if spec.scenario == "deep" and not spec.decomposition:
            ran.setdefault(spec.task, set()).add(spec.variant)
    assert ran == {t: set(v) for t, v in p["variants"].items()}
    for name in pipeline.profile_names():  # no profile restates the selection rule
        steps = pipeline.load_profile(name).steps
        assert not any(k.startswith("selection_") for s in steps for k in (s.params or {})), name


def _specs_of(profile: str) -> list[RunSpec]:
    prof = pipeline.load_profile(profile)
    out = []
    for step, params in pipeline.resolve_parameters(prof):
        if step.notebook == "04_transfer":
            p = {**pipeline.declared_parameters(pipeline.notebook_path(step)), **params}
            out += RunSpec.from_params(p)
    return out


def test_plan_record_names_the_commit_and_notices_uncommitted_edits(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    path = tmp_path / "params" / "plan.yaml"
    path.parent.mkdir()
    path.write_text("variants: {}\n")
    assert plan.plan_record(path, tmp_path)["commit"] is None  # no repository
    git("init", "-q")
    git("-c", "user.email=a@b", "-c", "user.name=a", "add", ".")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "plan")
    rec = plan.plan_record(path, tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert rec["path"] == "params/plan.yaml" and rec["commit"] == head and rec["matches_head"] is True
    assert len(rec["sha256"]) == 64
    assert "committed in" in plan_sentences({"plan": rec})[0]
    path.write_text("variants: {edited: true}\n")
    edited = plan.plan_record(path, tmp_path)
    assert edited["matches_head"] is False and edited["sha256"] != rec["sha256"]
    assert "differs from the committed one" in plan_sentences({"plan": edited})[0]


def _frame(rows: list[tuple[str, str, int, int]]) -> pd.DataFrame:
    """(label, source, films, correct) cells as out-of-fold predictions, one patient per film."""
    out = []
    for label, source, n, right in rows:
        other = "normal" if label != "normal" else "covid"
        for i in range(n):
            out.append({"image": f"{label}_{source}_{i}", "split": "test", "label": label, "source_name": source,
                        "patient_group": f"{label}_{source}_{i}", "pred": label if i < right else other})
    return pd.DataFrame(out)


def test_worst_group_accuracy_names_the_worst_label_source_cell():
    preds = _frame([("covid", "ieee8023", 20, 18), ("covid", "mhh", 12, 6), ("normal", "nih", 30, 29),
                    ("normal", "figure1", 1, 0)])  # a one-film cell does not compete
    preds = pd.concat([preds, preds.head(3).assign(split="val", pred="normal")], ignore_index=True)  # never read
    wga = worst_group_accuracy(preds, n_bootstrap=200, seed=0)
    assert (wga["group"], wga["label"], wga["source"], wga["n"]) == ("covid|mhh", "covid", "mhh", 12)
    assert wga["value"] == pytest.approx(0.5) and wga["ci_low"] <= 0.5 <= wga["ci_high"] and wga["ci_high"] < 0.95
    cells = {g["group"]: g for g in wga["groups"]}
    assert cells["normal|figure1"]["accuracy"] == 0 and not cells["normal|figure1"]["competes"]
    assert sum(g["n"] for g in wga["groups"]) == 63
    assert worst_group_accuracy(preds, n_bootstrap=200, seed=0) == wga  # seeded
    none = worst_group_accuracy(_frame([("covid", "x", 3, 3), ("normal", "y", 4, 4)]), n_bootstrap=10)
    assert none["value"] is None and "10 or more films" in none["note"]


def test_variant_sentences_read_intervals_and_say_undetermined_on_overlap():
    assert compare_intervals({"ci_low": 0.8, "ci_high": 0.9}, {"ci_low": 0.5, "ci_high": 0.7}) == "better"
    assert compare_intervals({"ci_low": 0.5, "ci_high": 0.75}, {"ci_low": 0.7, "ci_high": 0.8}) == "undetermined"
    assert compare_intervals({"ci_low": 0.1, "ci_high": 0.2}, {"ci_low": 0.5, "ci_high": 0.7}) == "worse"

    def entry(cid: str, metric: str, lo: float, hi: float) -> dict:
        return {"config_id": cid, "metric": metric, "value": (lo + hi) / 2, "ci_low": lo, "ci_high": hi,
                "confounders": {"view_matched": {"ci_low": lo - 0.05, "ci_high": hi - 0.05}}}

    configs = [{"run_id": v, "variant": v, "task": "t", "scenario": "deep", "decomposition": False,
                "worst_group_accuracy": {"ci_low": 0.3, "ci_high": 0.5}} for v in ("baseline", "dfr", "group_dro")]
    card = [entry("baseline", "ieee8023_covid_vs_pneumonia_auc", 0.5, 0.6),
            entry("dfr", "ieee8023_covid_vs_pneumonia_auc", 0.7, 0.9),
            entry("group_dro", "ieee8023_covid_vs_pneumonia_auc", 0.55, 0.7)]
    dfr, dro = variant_sentences({"configurations": configs, "scorecard": card})
    assert dfr.startswith("dfr (t, deep) beats the baseline beyond the intervals on S1, S1 view-matched")
    assert "worst-group accuracy undetermined" in dfr
    assert dro.startswith("group_dro (t, deep) does not beat the baseline") and "S1 undetermined" in dro


def _fold_runs(root: Path) -> Path:
    """Three configurations (deep baseline, DFR, group DRO), one fold run each, with hand-made predictions."""
    import json

    rng = np.random.default_rng(0)
    labels = np.array(["covid", "normal"] * 24)
    for variant in ("baseline", "dfr", "group_dro"):
        spec = RunSpec("covid_vs_normal", "efficientnet_lite0", "deep", False, 0, variant, 64, fold=0)
        d = root / "runs" / spec.run_id
        d.mkdir(parents=True)
        rows = []
        for split in ("val", "test"):
            right = rng.random(len(labels)) < 0.8
            p = np.where((labels == "covid") == right, 0.8, 0.2)
            rows += [{"image": f"{split}{i}.png", "split": split, "label": lab, "source": "s/x",
                      "source_name": ("ieee8023", "nih")[i % 4 // 2], "patient_group": f"{split}g{i}",
                      "prob_covid": p[i], "prob_normal": 1 - p[i], "pred": "covid" if p[i] > 0.5 else "normal"}
                     for i, lab in enumerate(labels)]
        pd.DataFrame(rows).to_csv(d / "predictions.csv", index=False)
        info = {**spec.to_record(), "run_id": spec.run_id, "config_id": spec.config_id, "folds": 2,
                "classes": ["covid", "normal"], "subclasses": ["covid", "normal"], "image_size": 64,
                "train_seconds": 1.0}
        (d / "run.json").write_text(json.dumps(info))
    return root


def test_results_json_records_the_plan_and_each_configurations_worst_group(tmp_path):
    import hashlib
    import json

    from cxrstudy import config
    from cxrstudy.reporting.results import build_results

    pdir = _fold_runs(tmp_path / "prof")
    manifest = pd.DataFrame({"image": ["a"], "label": ["covid"], "split": ["train"], "source_name": ["nih"],
                             "patient_group": ["p"]})
    res = build_results(pdir, manifest, n_bootstrap=50)
    assert json.loads((pdir / "results.json").read_text())["plan"] == res["plan"]
    assert res["plan"]["path"] == "params/plan.yaml"
    assert res["plan"]["sha256"] == hashlib.sha256((config.PARAMS_DIR / "plan.yaml").read_bytes()).hexdigest()
    assert res["plan"]["matches_head"] in (True, False)  # this checkout is a git repository
    assert [c["variant"] for c in res["configurations"]] == ["baseline", "dfr", "group_dro"]
    for c in res["configurations"]:
        wga = c["worst_group_accuracy"]
        assert wga["group"] in {"covid|ieee8023", "covid|nih", "normal|ieee8023", "normal|nih"} and wga["n"] == 12
    assert any(s.startswith("dfr (covid_vs_normal, deep)") for s in res["verdict"])
    assert any("analysis plan params/plan.yaml" in s for s in res["verdict"])


def test_dfr_and_group_dro_runs_are_selection_candidates(tmp_path):
    from cxrstudy.evaluation import cv, selection
    from cxrstudy.reporting.results import load_runs

    runs = cv.oof_runs(load_runs(_fold_runs(tmp_path / "prof")))
    cands = selection.candidates(runs, "covid_vs_normal", "deep", floor=0.0)
    assert [c["variant"] for c in cands] == ["baseline", "dfr", "group_dro"]
    assert selection.select_variant(runs, "covid_vs_normal", "deep", max_drop=1.0)["name"] in {c["variant"] for c in cands}
