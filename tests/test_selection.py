"""The recommended variant is chosen on validation rows only, by the rule fixed in notebook 05's parameters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrstudy.data.sources import SOURCES
from cxrstudy.evaluation import selection as S

TASK, SCENARIO = "covid_normal_pneumonia", "deep"
CLASSES = ["covid", "normal", "pneumonia"]
#: (source, label, films) of every split of the synthetic predictions, as in the real manifest's sources.
FILMS = (("ieee8023", "covid", 20), ("ieee8023", "pneumonia", 20), ("cxnet", "covid", 20), ("nih", "normal", 20),
         ("nih", "pneumonia", 20))


def _rows(split: str, s_paper: float, s_contrast: float, rng: np.random.Generator) -> pd.DataFrame:
    """Predictions of one split: ``s_paper`` separates covid from normal (paper task) and ``s_contrast`` the
    within-source pairs (ieee8023 covid vs pneumonia, NIH pneumonia vs normal), each without moving the other."""
    parts = []
    for source, label, n in FILMS:
        logits = rng.normal(size=(n, 3))
        if label in ("covid", "normal"):
            logits[:, CLASSES.index(label)] += s_paper
            logits[:, 2] -= s_contrast
        else:  # pneumonia films: the same covid / normal boost as the films they are ranked against
            logits[:, :2] += s_paper
            logits[:, 2] += s_contrast
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        frame = pd.DataFrame(
            {"image": [f"images/{source}/{split}_{label}_{i}.png" for i in range(n)], "split": split, "label": label,
             "source": SOURCES[source].repo, "patient_group": [f"pg_{source}_{split}_{label}_{i // 2}" for i in range(n)]}
        )
        for j, c in enumerate(CLASSES):
            frame[f"prob_{c}"] = probs[:, j]
        frame["pred"] = np.asarray(CLASSES)[probs.argmax(axis=1)]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def _run(variant: str, seed: int, val: tuple[float, float], test: tuple[float, float], **info) -> dict:
    """A ``reporting.results.load_runs`` item with real-shaped predictions of the val and test splits."""
    rng = np.random.default_rng(seed + 100 * len(variant))
    preds = pd.concat([_rows("val", *val, rng), _rows("test", *test, rng)], ignore_index=True)
    run_info = {"task": TASK, "backbone": "efficientnet_lite0", "scenario": SCENARIO, "decomposition": False,
                "seed": seed, "classes": CLASSES, "variant": variant, **info}
    return {"dir": None, "info": run_info, "predictions": preds}


def _by_variant(result: dict) -> dict[str, dict]:
    return {c["variant"]: c for c in result["candidates"]}


def test_the_choice_follows_validation_and_cannot_read_test_rows():
    # validation favours "lung" (same accuracy, higher within-source contrast); test favours "baseline"
    runs = [_run("baseline", s, val=(3.0, 0.3), test=(4.0, 4.0)) for s in (0, 1)]
    runs += [_run("lung", s, val=(3.0, 3.0), test=(0.0, 0.0)) for s in (0, 1)]
    chosen = S.select_variant(runs, TASK, SCENARIO, 0.90)
    cands = _by_variant(chosen)
    assert chosen["name"] == "lung" and all(c["passes_floor"] for c in cands.values())
    assert cands["lung"]["val_within_source_auc"] > cands["baseline"]["val_within_source_auc"] + 0.2
    # what test says is the opposite: the baseline wins there on both scores
    test_as_val = {v: r["predictions"][r["predictions"]["split"] == "test"].assign(split="val")
                   for v, r in (("baseline", runs[0]), ("lung", runs[2]))}
    test_scores = {v: S.validation_scores(S.validation_rows(p)) for v, p in test_as_val.items()}
    assert test_scores["baseline"]["val_within_source_auc"] > test_scores["lung"]["val_within_source_auc"]
    # every test row altered: labels shuffled, probabilities unusable, predictions and sources garbled
    rng = np.random.default_rng(7)
    for run in runs:
        p = run["predictions"]
        test = p["split"] == "test"
        p.loc[test, "label"] = rng.permutation(p.loc[test, "label"].to_numpy())
        p.loc[test, ["prob_covid", "prob_normal", "prob_pneumonia"]] = np.nan
        p.loc[test, "pred"] = "bogus"
        p.loc[test, "source"] = "nobody/nothing"
    again = S.select_variant(runs, TASK, SCENARIO, 0.90)
    assert again["name"] == "lung" and again["candidates"] == chosen["candidates"] and again["rule"] == chosen["rule"]
    # and with no test rows at all
    for run in runs:
        run["predictions"] = run["predictions"][run["predictions"]["split"] != "test"]
    assert S.select_variant(runs, TASK, SCENARIO, 0.90)["candidates"] == chosen["candidates"]


def test_only_validation_rows_reach_the_scores():
    run = _run("baseline", 0, val=(3.0, 3.0), test=(0.0, 0.0))
    val = S.validation_rows(run["predictions"])
    assert set(val["split"]) == {"val"} and set(val["source_name"]) == {"ieee8023", "cxnet", "nih"}
    with pytest.raises(ValueError, match="validation rows only"):
        S.validation_scores(_rows("test", 1.0, 1.0, np.random.default_rng(0)).assign(source_name="nih"))


def test_floor_keeps_the_paper_task_and_falls_back_to_validation_accuracy():
    runs = [_run("baseline", s, val=(3.0, 0.3), test=(3.0, 0.3)) for s in (0, 1)]
    runs += [_run("lung_adversary", s, val=(0.2, 4.0), test=(0.2, 4.0)) for s in (0, 1)]
    chosen = S.select_variant(runs, TASK, SCENARIO, 0.90)
    cands = _by_variant(chosen)
    # lung_adversary separates the sources' pairs best but loses the paper's task: the floor rules it out
    assert cands["lung_adversary"]["val_within_source_auc"] > cands["baseline"]["val_within_source_auc"]
    assert cands["lung_adversary"]["val_paper_task_accuracy"] < 0.9 <= cands["baseline"]["val_paper_task_accuracy"]
    assert [c["passes_floor"] for c in chosen["candidates"]] == [True, False]  # baseline listed first
    assert chosen["name"] == "baseline" and chosen["passed_floor"] is True
    assert S.select_variant(runs, TASK, SCENARIO, 0.50)["name"] == "lung_adversary"  # both pass: contrast decides
    none = S.select_variant(runs, TASK, SCENARIO, 0.9999)
    assert none["name"] == "baseline" and none["passed_floor"] is False
    assert "No variant reaches the floor of 0.9999" in none["rule"]


def test_scores_are_seed_means_of_matching_runs_only():
    runs = [_run("lung", 0, val=(3.0, 3.0), test=(0.0, 0.0)), _run("lung", 1, val=(0.5, 0.5), test=(0.0, 0.0))]
    others = [
        _run("lung", 2, val=(0.0, 0.0), test=(0.0, 0.0), decomposition=True),
        _run("lung", 3, val=(0.0, 0.0), test=(0.0, 0.0), scenario="shallow"),
        _run("lung", 4, val=(0.0, 0.0), test=(0.0, 0.0), task="covid_vs_normal"),
    ]
    [cand] = S.select_variant(runs + others, TASK, SCENARIO, 0.5)["candidates"]
    per_seed = [S.validation_scores(S.validation_rows(r["predictions"])) for r in runs]
    assert cand["n_seeds"] == 2 and cand["seeds"] == [0, 1]
    for key in ("val_paper_task_accuracy", "val_within_source_auc"):
        assert cand[key] == pytest.approx(np.mean([s[key] for s in per_seed]))
    empty = S.select_variant(runs, "covid_vs_normal", SCENARIO, 0.9)
    assert empty["name"] is None and empty["candidates"] == [] and "nothing recommended" in empty["rule"]


def test_the_rule_states_its_numbers():
    runs = [_run("baseline", 0, val=(3.0, 0.3), test=(0.0, 0.0)), _run("lung", 0, val=(3.0, 3.0), test=(0.0, 0.0))]
    chosen = S.select_variant(runs, TASK, SCENARIO, 0.925)
    rule = chosen["rule"]
    assert ">= 0.925 (92.5%)" in rule and TASK in rule and SCENARIO in rule and "validation" in rule
    assert "'lung' has the highest within-source contrast" in rule and "2 of 2 variants reach the floor" in rule
    assert set(chosen) >= {"name", "rule", "task", "scenario", "candidates"}
    assert set(chosen["candidates"][0]) >= {"variant", "n_seeds", "val_paper_task_accuracy", "val_within_source_auc",
                                            "passes_floor"}


def test_a_relative_floor_is_set_on_the_baselines_validation_accuracy():
    # baseline: high paper-task accuracy, low contrast; "lung" slightly worse on the paper's task but within the
    # drop, "lung_adversary" far worse: only the relative floor tells them apart
    runs = [_run("baseline", s, val=(4.0, 0.3), test=(4.0, 0.3)) for s in (0, 1)]
    runs += [_run("lung", s, val=(3.0, 3.0), test=(3.0, 3.0)) for s in (0, 1)]
    runs += [_run("lung_adversary", s, val=(0.2, 6.0), test=(0.2, 6.0)) for s in (0, 1)]
    base = S.candidates(runs, TASK, SCENARIO, 0.0)[0]
    chosen = S.select_variant(runs, TASK, SCENARIO, max_drop=0.05)
    assert chosen["floor"] == pytest.approx(base["val_paper_task_accuracy"] - 0.05)
    assert "minus 0.05" in chosen["rule"]
    passes = {c["variant"]: c["passes_floor"] for c in chosen["candidates"]}
    assert passes == {"baseline": True, "lung": True, "lung_adversary": False}
    assert chosen["name"] == "lung"
    assert S.select_variant(runs, TASK, SCENARIO, max_drop=0.5)["name"] == "lung_adversary"  # loose: contrast wins
    with pytest.raises(ValueError, match="exactly one"):
        S.select_variant(runs, TASK, SCENARIO, 0.9, max_drop=0.05)
    with pytest.raises(ValueError, match="no baseline run"):
        S.select_variant([r for r in runs if r["info"].get("variant") not in (None, "baseline")], TASK, SCENARIO,
                         max_drop=0.05)


def test_the_view_matched_contrast_gives_projection_no_credit():
    """A variant that knows only the projection (it raises P(pneumonia) on AP films, and pneumonia films are
    mostly AP) beats a variant with real within-source skill on every pair, and loses on same-view pairs."""
    runs = [_run("baseline", s, val=(3.0, 0.6), test=(3.0, 0.6)) for s in (0, 1)]
    runs += [_run("portable", s, val=(3.0, 0.0), test=(3.0, 0.0)) for s in (0, 1)]
    films = pd.concat([r["predictions"] for r in runs]).drop_duplicates("image").reset_index(drop=True)
    index = films["image"].str.extract(r"_(\d+)\.png$")[0].astype(int)
    ap = np.where(films["label"] == "pneumonia", index % 5 != 0, index % 5 == 0)  # pneumonia 80% AP, others 20%
    manifest = films[["image", "label", "source", "patient_group", "split"]].assign(
        view=np.where(ap, "AP", "PA"), source_name=films["image"].str.split("/").str[1]
    )
    is_ap = manifest.set_index("image")["view"] == "AP"
    for r in runs[2:]:
        p = r["predictions"]
        p["prob_pneumonia"] = p["prob_pneumonia"] + 3.0 * p["image"].map(is_ap).to_numpy()
    every = S.select_variant(runs, TASK, SCENARIO, 0.5, contrast="all_pairs")
    matched = S.select_variant(runs, TASK, SCENARIO, 0.5, contrast="view_matched", manifest=manifest)
    assert every["name"] == "portable" and matched["name"] == "baseline"
    assert matched["contrast"] == "view_matched" and "same-view pairs only" in matched["rule"]
    port_all, port_vm = (_by_variant(x)["portable"]["val_within_source_auc"] for x in (every, matched))
    assert port_vm < port_all and port_vm < _by_variant(matched)["baseline"]["val_within_source_auc"]
    with pytest.raises(ValueError, match="needs the manifest"):
        S.select_variant(runs, TASK, SCENARIO, 0.5, contrast="view_matched")
