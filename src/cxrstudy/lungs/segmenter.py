"""``LungSegmenter``: the saved lung U-Net applied at run time to any film (external sets, ``predict``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrstudy.lungs.model import LungUNet
from cxrstudy.lungs.qc import THRESHOLD, LungQC, postprocess
from cxrstudy.lungs.train import predict_probs

MODEL_FILE = "model.pth"
MODEL_META = "model.json"


class LungSegmenter:
    """Predict post-processed, QC-checked lung masks at each image's own size."""

    def __init__(
        self,
        model: LungUNet,
        image_size: int,
        threshold: float = THRESHOLD,
        device: str | torch.device = "cpu",
    ) -> None:
        from cxrstudy.config import resolve_device

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.image_size = int(image_size)
        self.threshold = float(threshold)

    @classmethod
    def load(cls, folder: Path | str, device: str | torch.device = "cpu") -> LungSegmenter:
        """From a folder holding ``model.pth`` (state dict) and ``model.json`` (image size, decoder, threshold),
        e.g. ``reports/<profile>/lungs/`` or a cache entry."""
        folder = Path(folder)
        weights, meta_path = folder / MODEL_FILE, folder / MODEL_META
        if not weights.is_file() or not meta_path.is_file():
            raise FileNotFoundError(
                f"no saved lung model in {folder} (need {MODEL_FILE} and {MODEL_META}); "
                "run notebook 01_lungs for this profile first"
            )
        meta = json.loads(meta_path.read_text())
        model = LungUNet(tuple(meta["decoder"]), pretrained=False)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        return cls(model, meta["image_size"], meta.get("threshold", THRESHOLD), device)

    @classmethod
    def for_profile(cls, profile: str, device: str | torch.device = "cpu") -> LungSegmenter:
        """The model a profile's 01_lungs step saved in ``reports/<profile>/lungs/``."""
        from cxrstudy.config import profile_dir

        return cls.load(profile_dir(profile) / "lungs", device)

    def _check(self, img: Image.Image) -> None:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(img).__name__}")
        if img.mode != "L":
            raise ValueError(
                f"expected an 8-bit grayscale image (mode 'L'), got {img.mode!r}; "
                "decode with cxrstudy.images.load_xray"
            )

    def probabilities(self, images: list[Image.Image], batch_size: int = 32) -> list[np.ndarray]:
        """Lung probability map (H,W) of each image."""
        for img in images:
            self._check(img)
        return predict_probs(self.model, images, self.image_size, self.device, batch_size)

    def analyse_many(
        self, images: list[Image.Image], batch_size: int = 32
    ) -> list[tuple[np.ndarray, LungQC]]:
        """(final mask, QC) per image; a film failing QC gets the fallback mask (all ones)."""
        probs = self.probabilities(images, batch_size)
        prior = self.model.shape_prior.detach().cpu().numpy()
        return [
            postprocess(p, np.asarray(img), self.threshold, prior)
            for img, p in zip(images, probs, strict=True)
        ]

    def analyse(self, img: Image.Image) -> tuple[np.ndarray, LungQC]:
        """(final mask, QC) of one image."""
        return self.analyse_many([img])[0]

    def predict(self, img: Image.Image) -> np.ndarray:
        """Boolean lung mask (H,W) at the image's size; all ones when the film fails QC."""
        return self.analyse(img)[0]
