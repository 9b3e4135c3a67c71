"""Class-conditional source adversary: gradient reversal, ramp, training-only source codes, fastai callback."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders

from cxrstudy.training.adversary import (
    SourceAdversary,
    SourceAdversaryCallback,
    SourceCodes,
    adversary_weight,
    grad_reverse,
    make_source_adversary,
    with_source_column,
)

CLASSES = ("covid", "normal")


def _rows() -> pd.DataFrame:
    """16 training rows (covid from A and B, normal from C and D) and 4 val + 4 test rows."""
    train = [("covid", "A"), ("covid", "B"), ("normal", "C"), ("normal", "D")] * 4
    train[1] = ("covid", "A")  # covid: A 5, B 3; normal: C 4, D 4 -> majority codes (0, 0)
    val = [("covid", "X"), ("normal", "C"), ("covid", "A"), ("normal", "Y")]
    test = [("normal", "Z"), ("covid", "B"), ("covid", "A"), ("normal", "D")]
    recs = [
        (lab, src, split)
        for split, part in (("train", train), ("val", val), ("test", test))
        for lab, src in part
    ]
    rows = pd.DataFrame(recs, columns=["label", "source_name", "split"])
    rows["image"] = [f"im{i}.png" for i in range(len(rows))]
    return rows


# ------------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("lambd", [0.5, 2.0])
def test_grad_reverse_flips_and_scales_gradient(lambd: float) -> None:
    x = torch.randn(5, 3, requires_grad=True)
    c = torch.randn(5, 3)
    (x * c).pow(2).sum().backward()
    ref = x.grad.clone()
    x.grad = None
    y = grad_reverse(x, lambd)
    assert torch.equal(y, x)
    (y * c).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, -lambd * ref)


def test_ramp_starts_at_zero_increases_to_max() -> None:
    w = [adversary_weight(s, 100, 0.3) for s in range(101)]
    assert w[0] == 0.0
    assert all(b > a for a, b in zip(w, w[1:], strict=False))
    assert 0.999 * 0.3 < w[-1] <= 0.3
    assert adversary_weight(500, 100, 0.3) == w[-1]  # clamped after the end
    assert adversary_weight(0, 100, 0.3, schedule="constant") == 0.3
    with pytest.raises(ValueError):
        adversary_weight(0, 100, 0.3, schedule="linear")


def test_source_codes_never_see_validation_or_test() -> None:
    rows = _rows()
    codes = SourceCodes.from_rows(rows, CLASSES)
    assert codes.sources == (("A", "B"), ("C", "D"))
    assert codes.counts == ((5, 3), (4, 4)) and codes.majority == (0, 0)
    assert all(s not in {"X", "Y", "Z"} for ss in codes.sources for s in ss)
    enc = codes.encode(rows)
    assert (enc[(rows["split"] != "train").to_numpy()] == -1).all()
    assert (enc[(rows["split"] == "train").to_numpy()] >= 0).all()
    # changing validation/test rows (labels and sources) changes nothing
    other = rows.copy()
    ev = other["split"] != "train"
    other.loc[ev, "source_name"] = "NEW"
    other.loc[ev, "label"] = other.loc[ev, "label"].map({"covid": "normal", "normal": "covid"})
    assert SourceCodes.from_rows(other, CLASSES) == codes
    np.testing.assert_array_equal(SourceCodes.from_rows(other, CLASSES).encode(other), enc)


def test_with_source_column_keeps_composed_loss() -> None:
    from cxrstudy.training.labels import ComposedLoss, identity_labels, make_targets

    rows = _rows()
    space = identity_labels(CLASSES)
    t2 = make_targets(rows, space, None)
    t3 = with_source_column(t2, rows, SourceCodes.from_rows(rows, CLASSES))
    assert t3.shape == (len(rows), 3) and np.array_equal(t3[:, :2], t2)
    loss, logits = ComposedLoss(space.matrix()), torch.randn(len(rows), 2)
    torch.testing.assert_close(loss(logits, torch.tensor(t3)), loss(logits, torch.tensor(t2)))


def test_single_source_class_contributes_no_loss() -> None:
    rows = _rows()
    rows.loc[(rows["split"] == "train") & (rows["label"] == "normal"), "source_name"] = "C"
    codes = SourceCodes.from_rows(rows, CLASSES)
    assert codes.n_sources == (2, 1)
    assert (codes.encode(rows)[(rows["label"] == "normal").to_numpy()] == -1).all()
    adv = SourceAdversary(8, codes.n_sources, hidden=4)
    assert set(adv.heads) == {"0"}
    feats = torch.randn(6, 8, requires_grad=True)
    cls, src = torch.tensor([1, 1, 1, 0, 0, 1]), torch.tensor([0, 0, 0, 1, 0, 0])
    only_normal = adv(feats[[0, 1, 2, 5]], cls[[0, 1, 2, 5]], src[[0, 1, 2, 5]])
    assert only_normal.items == 0 and float(only_normal.loss.detach()) == 0.0
    only_normal.loss.backward()
    assert feats.grad is None or not feats.grad.any()
    mixed = adv(feats, cls, src)
    torch.testing.assert_close(mixed.loss, adv(feats[[3, 4]], cls[[3, 4]], src[[3, 4]]).loss)
    assert mixed.items == 2


# ------------------------------------------------------------------------------------ fastai end to end


class Spy(Callback):
    """Records training losses, the first batch's gradients and validation losses (after the adversary)."""

    order = 45

    def __init__(self) -> None:
        self.train_losses: list[float] = []
        self.valid_losses: list[float] = []
        self.grads: dict[str, torch.Tensor] = {}

    def after_loss(self) -> None:
        (self.train_losses if self.learn.training else self.valid_losses).append(
            float(self.learn.loss.detach())
        )

    def after_backward(self) -> None:
        if not self.grads:
            m = self.learn.model
            self.grads = {
                "stem": m.backbone.conv_stem.weight.grad.clone(),
                "head": m.head.weight.grad.clone(),
            }


def _fit(tmp: Path, with_adversary: bool, model: torch.nn.Module) -> tuple[Spy, Any, Any]:
    """One epoch (2 batches of 8) at lr 0 (weights unchanged, so runs compare batch by batch) on 32 px images."""
    from torch.utils.data import DataLoader, TensorDataset

    from cxrstudy.training.labels import ComposedLoss, identity_labels, make_targets
    from cxrstudy.training.learner import make_learner

    rows = _rows()
    space = identity_labels(CLASSES)
    codes = SourceCodes.from_rows(rows, CLASSES)
    targets = with_source_column(make_targets(rows, space, None), rows, codes)
    images = torch.randint(0, 256, (len(rows), 1, 32, 32), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )
    loaders = []
    for split in ("train", "val"):
        m = (rows["split"] == split).to_numpy().copy()
        x = images[torch.tensor(m)].float().div(127.5).sub(1.0).repeat(1, 3, 1, 1)
        ds = TensorDataset(x, torch.as_tensor(targets[m], dtype=torch.long))
        loaders.append(DataLoader(ds, batch_size=8, shuffle=False))
    learn = make_learner(model, DataLoaders(*loaders), ComposedLoss(space.matrix()), lr=1e-3, path=tmp)
    spy, cbs, cb = Spy(), [], None
    if with_adversary:
        torch.manual_seed(1)
        cb = SourceAdversaryCallback(
            make_source_adversary(model, codes, hidden=16), codes, 0.5, schedule="constant"
        )
        calls: list[bool] = []
        cb.adversary.register_forward_pre_hook(lambda mod, args: calls.append(learn.training))
        cb.calls = calls
        cbs = [cb]
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=0.0, cbs=[spy, *cbs])
    return spy, learn, cb


def test_callback_adds_term_in_training_only(tmp_path: Path) -> None:
    from cxrstudy.models import Classifier

    torch.manual_seed(0)
    base = Classifier("efficientnet_lite0", 2, pretrained=False, dropout=0.0)
    plain, learn0, _ = _fit(tmp_path / "a", False, copy.deepcopy(base))
    spy, learn1, cb = _fit(tmp_path / "b", True, copy.deepcopy(base))

    # the recorded training loss is the plain loss + weight * adversary loss, batch by batch
    log = pd.DataFrame(cb.batch_log)
    assert len(log) == len(plain.train_losses) == 2 and (log["weight"] == 0.5).all()
    assert (log["items"] > 0).all() and (log["adv_loss"] > 0).all()
    diff = np.array(spy.train_losses) - np.array(plain.train_losses)
    np.testing.assert_allclose(diff, 0.5 * log["adv_loss"].to_numpy(), rtol=1e-4, atol=1e-6)

    # the reversed gradient reaches the backbone; the class head is untouched by the adversary
    assert not torch.allclose(spy.grads["stem"], plain.grads["stem"])
    torch.testing.assert_close(spy.grads["head"], plain.grads["head"])

    # validation never runs the adversary and its losses are those of the plain run
    assert cb.calls == [True] * 2
    assert spy.valid_losses == pytest.approx(plain.valid_losses, rel=1e-6)
    assert learn1.recorder.values[-1][1] == pytest.approx(learn0.recorder.values[-1][1], rel=1e-6)
    assert cb._handle is None  # hook removed after the fit

    frame = cb.log_frame()
    assert list(frame["epoch"]) == [1] and int(frame["items"].iloc[0]) == 16
    assert 0.0 <= frame["adv_accuracy"].iloc[0] <= 1.0
    assert frame["majority_accuracy"].iloc[0] == pytest.approx(9 / 16)
    assert math.isclose(frame["adv_loss"].iloc[0], np.average(log["adv_loss"], weights=log["items"]))

    # lr_find fits leave the adversary alone
    n = cb.n_steps
    learn1.add_cb(cb)
    with learn1.no_bar(), learn1.no_logging():
        learn1.lr_find(num_it=5, show_plot=False)
    assert cb.n_steps == n
