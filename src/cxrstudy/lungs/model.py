"""A small U-Net: timm ``tf_efficientnet_lite0`` encoder (offline ImageNet weights) + a light decoder.

Input: uint8 grey (B,1,S,S) batches, squish-resized like every other model of the study; the
network replicates them to 3 channels and normalises them as the weights expect, ``(x - 127) / 128``.
Output: lung logits (B,1,S,S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxrstudy.lungs.qc import SHAPE_SIZE

ENCODER_ARCH = "tf_efficientnet_lite0"
ENCODER_WEIGHTS = "efficientnet_lite0"  # cxrstudy.models offline weights package
#: Decoder widths, deepest first: one block per skip (strides 16, 8, 4, 2). The head predicts at
#: stride 2 and its logits are upsampled bilinearly to the input size: a full-resolution stage would
#: double the decoder's cost on a CPU for no visible gain on smooth lung outlines.
DEFAULT_DECODER = (96, 64, 48, 32)


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) + BatchNorm + ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )


class DecoderBlock(nn.Module):
    """Upsample (bilinear) to the skip's size, concatenate the skip, two ConvBNReLU."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(ConvBNReLU(cin + cskip, cout), ConvBNReLU(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class LungUNet(nn.Module):
    """U-Net for one class (lung) on uint8 grey input; ``forward`` returns logits (B,1,H,W)."""

    def __init__(self, decoder: tuple[int, ...] = DEFAULT_DECODER, pretrained: bool = True) -> None:
        super().__init__()
        import timm

        if len(decoder) != 4:
            raise ValueError(f"decoder needs 4 widths (strides 16, 8, 4, 2), got {decoder}")
        self.encoder = timm.create_model(ENCODER_ARCH, features_only=True, pretrained=False)
        if pretrained:
            load_encoder_weights(self.encoder)
        chans = self.encoder.feature_info.channels()  # [16, 24, 40, 112, 320] at strides 2..32
        skips = chans[:-1][::-1]  # 112, 40, 24, 16
        blocks, cin = [], chans[-1]
        for cskip, cout in zip(skips, decoder, strict=True):
            blocks.append(DecoderBlock(cin, cskip, cout))
            cin = cout
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, 1, 1)
        # mean bounding-box-normalised training mask, for the QC's shape rule (zeros until trained)
        self.register_buffer("shape_prior", torch.zeros(SHAPE_SIZE, SHAPE_SIZE))
        self.register_buffer("mean", torch.tensor(127.0), persistent=False)
        self.register_buffer("scale", torch.tensor(1.0 / 128.0), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float 0..255 (B,1,H,W) -> float (B,3,H,W) normalised as the weights expect."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grey batches (B,1,H,W), got shape {tuple(x.shape)}")
        x = (x.float() - self.mean) * self.scale
        return x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B,1,H,W) for uint8/0..255 grey input (B,1,H,W); H and W multiples of 32."""
        feats = self.encoder(self.normalise(x))
        y = feats[-1]
        for block, skip in zip(self.decoder, feats[:-1][::-1], strict=True):
            y = block(y, skip)
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def load_encoder_weights(encoder: nn.Module) -> None:
    """Load the offline ImageNet weights into a ``features_only`` encoder; every encoder weight must load.

    The weights file holds the full classifier (``conv_head``, ``bn2``, ``classifier`` too); those keys
    are unexpected here and ignored. A missing key means part of the encoder stayed random: an error.
    """
    from cxrstudy.models import lite_weights_path, lukemelas_to_timm

    raw = torch.load(lite_weights_path(ENCODER_WEIGHTS), map_location="cpu", weights_only=True)
    stage_lengths = [len(stage) for stage in encoder.blocks]
    mapped = lukemelas_to_timm(raw, stage_lengths)
    result = encoder.load_state_dict(mapped, strict=False)
    if result.missing_keys:
        raise RuntimeError(
            f"{len(result.missing_keys)} encoder weight(s) not found in the ImageNet file, e.g. "
            f"{result.missing_keys[:5]}; the encoder would be partly random"
        )
    allowed = ("conv_head.", "bn2.", "classifier.")
    odd = [k for k in result.unexpected_keys if not k.startswith(allowed)]
    if odd:
        raise RuntimeError(f"unexpected weights for the encoder: {odd[:5]}")
