"""Class decomposition finds planted clusters, refuses non-training rows, and composition maps back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from cxrstudy.decomposition import (
    compose,
    compose_hard,
    composition_matrix,
    fit_decomposition,
    load_decomposition,
    save_decomposition,
)

CLASSES = ("covid", "normal", "pneumonia")


def planted(n_clusters: dict[str, int], per_cluster: int = 30, dim: int = 64, seed: int = 0):
    """Features with well-separated Gaussian blobs per class; returns (features, labels, true cluster ids)."""
    rng = np.random.default_rng(seed)
    rows, labels, truth = [], [], []
    for cls, k in n_clusters.items():
        for j in range(k):
            centre = rng.normal(0, 10, dim)
            rows.append(centre + rng.normal(0, 1, (per_cluster, dim)))
            labels += [cls] * per_cluster
            truth += [f"{cls}#{j}"] * per_cluster
    x = np.vstack(rows).astype(np.float32)
    order = rng.permutation(len(x))  # shuffle so cluster order is not row order
    index = pd.Index([f"images/x/{i:04d}.png" for i in range(len(x))], name="image")
    feats = pd.DataFrame(x[order], index=index, columns=[f"f{i}" for i in range(dim)])
    return feats, pd.Series(np.array(labels)[order], index=index), np.array(truth)[order]


def test_finds_planted_clusters_and_names_subclasses():
    feats, labels, truth = planted({"covid": 2, "normal": 2, "pneumonia": 2})
    decomp, sub = fit_decomposition(feats, labels, ["train"] * len(feats), k=2, seed=0)
    assert decomp.subclasses == ["covid_1", "covid_2", "normal_1", "normal_2", "pneumonia_1", "pneumonia_2"]
    assert decomp.k == {"covid": 2, "normal": 2, "pneumonia": 2}
    assert sub.index.equals(feats.index)
    assert adjusted_rand_score(truth, sub) == 1.0
    assert all(decomp.parent_of[s] == lab for s, lab in zip(sub, labels, strict=True))
    assert decomp.sizes == {s: 30 for s in decomp.subclasses}
    # silhouettes reported for every k in range; the planted k=2 scores best
    for cls in CLASSES:
        assert set(decomp.silhouettes[cls]) == {2, 3, 4, 5}
        assert max(decomp.silhouettes[cls], key=decomp.silhouettes[cls].get) == 2


def test_auto_k_picks_planted_number_per_class():
    feats, labels, truth = planted({"covid": 3, "normal": 1, "pneumonia": 4}, per_cluster=25)
    decomp, sub = fit_decomposition(feats, labels, np.full(len(feats), "train"), k="auto", k_range=(2, 6))
    assert decomp.k["covid"] == 3 and decomp.k["pneumonia"] == 4
    covid = (labels == "covid").to_numpy()
    assert adjusted_rand_score(truth[covid], sub[covid]) == 1.0


def test_deterministic_given_seed():
    feats, labels, _ = planted({"covid": 2, "normal": 2}, per_cluster=20)
    a = fit_decomposition(feats, labels, ["train"] * len(feats), k=3, seed=1)[1]
    b = fit_decomposition(feats, labels, ["train"] * len(feats), k=3, seed=1)[1]
    assert a.equals(b)


def test_k1_is_no_decomposition():
    feats, labels, _ = planted({"covid": 2, "normal": 2}, per_cluster=10)
    decomp, sub = fit_decomposition(feats, labels, ["train"] * len(feats), k=1)
    assert decomp.subclasses == ["covid", "normal"]
    assert (sub == labels).all()
    assert composition_matrix(decomp.subclasses, ["covid", "normal"]).tolist() == [[1, 0], [0, 1]]


def test_non_training_rows_are_refused_by_name():
    feats, labels, _ = planted({"covid": 2, "normal": 2}, per_cluster=10)
    splits = pd.Series("train", index=feats.index)
    splits.iloc[[3, 7]] = ["val", "test"]
    with pytest.raises(ValueError, match="non-train") as err:
        fit_decomposition(feats, labels, splits)
    assert feats.index[3] in str(err.value) and feats.index[7] in str(err.value)
    with pytest.raises(TypeError):
        fit_decomposition(feats, labels)  # splits are required


def test_bad_inputs_are_clear_errors():
    feats, labels, _ = planted({"covid": 1, "normal": 1}, per_cluster=5)
    train = ["train"] * len(feats)
    with pytest.raises(ValueError, match="unknown label"):
        fit_decomposition(feats, labels.replace("covid", "flu"), train)
    with pytest.raises(ValueError, match="fewer than k"):
        fit_decomposition(feats, labels, train, k=6)
    with pytest.raises(ValueError, match="rows"):
        fit_decomposition(feats, labels[:-1], train)
    with pytest.raises(ValueError, match="positive int or 'auto'"):
        fit_decomposition(feats, labels, train, k=0)


def test_composition_sums_subclasses_to_parents():
    subs = ["covid_1", "covid_2", "normal_1", "normal_2", "pneumonia"]
    m = composition_matrix(subs, CLASSES)
    assert m.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, len(subs)))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    composed = compose(p, subs, CLASSES)
    np.testing.assert_allclose(composed.sum(axis=1), 1.0)
    np.testing.assert_allclose(composed[:, 0], p[:, 0] + p[:, 1])
    np.testing.assert_allclose(composed[:, 2], p[:, 4])
    # DeTraC's hard rule can disagree with summing: 0.4 covid_1 vs 0.3 + 0.3 normal
    q = np.array([[0.4, 0.0, 0.3, 0.3, 0.0]])
    assert compose_hard(q, subs, CLASSES).tolist() == [0]
    assert compose(q, subs, CLASSES).argmax(axis=1).tolist() == [1]
    with pytest.raises(ValueError, match="summing to 1"):
        compose(logits, subs, CLASSES)
    with pytest.raises(ValueError, match="no parent"):
        composition_matrix(["flu_1"], CLASSES)


def test_save_and_load_round_trip(tmp_path):
    feats, labels, _ = planted({"covid": 2, "normal": 2, "pneumonia": 2}, per_cluster=8)
    decomp, sub = fit_decomposition(feats, labels, ["train"] * len(feats), k="auto", k_range=(2, 3))
    save_decomposition(tmp_path, decomp, sub)
    table = pd.read_csv(tmp_path / "decomposition" / "subclasses.csv")
    assert list(table.columns) == ["image", "label", "subclass"] and len(table) == len(feats)
    decomp2, sub2 = load_decomposition(tmp_path)
    assert decomp2 == decomp
    assert sub2.equals(sub.rename("subclass"))
    assert not list((tmp_path / "decomposition").glob(".*tmp"))
