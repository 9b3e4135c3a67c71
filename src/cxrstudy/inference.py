"""Saved runs on images the study never processed: the one path shared by ``make evaluate`` and ``cxrstudy predict``.

Images go through the study's preprocessing: the one decoder (``load_xray``), the data step's shrink to a
shorter side of 256 px, the run's input view (for a lung view, a mask from the profile's saved lung
model, then :func:`cxrstudy.lungs.render.render_one`), then the run's own ``resize_to_uint8`` and
``model_transform``.

A configuration's fold runs predict as one ensemble (:class:`Models`): the mean class probability over the fold
models (``evaluation.cv.ensemble_rows``). Every film also gets the lung stage's QC (``qc``: empty when it passes,
else its flags joined by ``;``); without a lung model only the image-level rules run and ``qc`` says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cxrstudy import config
from cxrstudy.runspec import RunSpec

#: (image size, interpolation, input view, equalise, view margin): what a run's input depends on beyond
#: the decoded film.
InputKey = tuple[int, str, str, bool, float]


def input_key(info: dict[str, Any]) -> InputKey:
    """What a run's model expects: size, interpolation and input view (runs without a view: the full film)."""
    from cxrstudy.models import get_spec

    spec = RunSpec.from_record(info)
    if spec.image_size is None:
        raise ValueError(f"run {spec.run_id}: run.json has no image_size")
    return (spec.image_size, get_spec(spec.backbone).interpolation, *spec.view)


def needs_lungs(keys: set[InputKey]) -> bool:
    """Whether any of the runs sees the film through a lung view."""
    from cxrstudy.lungs.render import is_plain

    return any(not is_plain(k[2], k[3]) for k in keys)


def view_mask(mask: np.ndarray, view: str, margin: float) -> np.ndarray:
    """The lung mask in the coordinates of a view's image (framed like the film: :func:`lungs.views.to_view_frame`)."""
    from cxrstudy.lungs.views import to_view_frame

    m = np.asarray(mask, dtype=bool)
    return to_view_frame(m, m, view, margin)


def decode_study(path: Path | str) -> Image.Image:
    """Decode one file as the data step does (grey, shorter side 256); raises ImageDecodeError naming it."""
    from cxrstudy.data.preprocess import TARGET_SHORT_SIDE
    from cxrstudy.images import load_xray, resize_short_side

    return resize_short_side(load_xray(path), TARGET_SHORT_SIDE)


#: What ``qc`` says of a film when the profile has no lung model to check it with.
UNCHECKED = "unchecked: no lung model"


def qc_text(flags: Sequence[str], checked: bool = True) -> str:
    """A film's ``qc`` cell: its QC flags joined by ``;`` (empty when it passes), plus :data:`UNCHECKED` when
    no lung model checked it."""
    return ";".join([*flags, *([] if checked else [UNCHECKED])])


def qc_problems(qc: str) -> list[str]:
    """The QC flags in a ``qc`` cell that make a film one the models cannot judge (all but :data:`UNCHECKED`)."""
    return [f for f in qc.split(";") if f and f != UNCHECKED] if isinstance(qc, str) else []


@dataclass
class Decoded:
    """Decoded files: readable indices, model-size inputs per key, unreadable (index, reason), lung masks and
    each readable film's ``qc`` cell (:func:`qc_text`); ``lungs_checked``: whether a lung model ran."""

    ok: list[int]
    inputs: dict[InputKey, list[Image.Image]]
    bad: list[tuple[int, str]]
    masks: list[np.ndarray | None]
    qc: list[str] = field(default_factory=list)
    lungs_checked: bool = False


def decode_for_models(
    paths: Sequence[str | Path], keys: set[InputKey], lungs_dir: Path | None = None, device: str = "cpu"
) -> Decoded:
    """Decode each file once and build each key's model-size input; the film's lung mask and QC come from the
    saved lung model in ``lungs_dir`` (``reports/<profile>/lungs``) when there is one, and it is required
    by a lung view; without one only the image-level QC rules run. Pre-resizing with ``resize_to_uint8``
    makes the model's own resize a no-op."""
    from cxrstudy.images import ImageDecodeError
    from cxrstudy.lungs.qc import image_flags
    from cxrstudy.lungs.render import is_plain, render_one
    from cxrstudy.models import resize_to_uint8

    seg = _segmenter(lungs_dir, device, required=needs_lungs(keys))
    out = Decoded([], {k: [] for k in keys}, [], [], [], seg is not None)
    for i, path in enumerate(paths):
        try:
            img = decode_study(path)
        except ImageDecodeError as exc:
            out.bad.append((i, exc.reason))
            continue
        if seg is not None:
            mask, qc = seg.analyse(img)
            flags = qc.qc_flags
        else:
            mask, flags = None, image_flags(np.asarray(img))
        out.ok.append(i)
        out.masks.append(mask)
        out.qc.append(qc_text(flags, seg is not None))
        for key in keys:
            size, interp, view, equalize, margin = key
            seen = img if is_plain(view, equalize) else render_one(img, mask, view, equalize, margin)
            arr = resize_to_uint8(seen, size, interp)[0].numpy()
            out.inputs[key].append(Image.fromarray(arr, mode="L"))
    return out


def _segmenter(lungs_dir: Path | None, device: str, required: bool) -> Any:
    """The saved lung model in ``lungs_dir``; None when there is none and no run needs it (else the error)."""
    from cxrstudy.lungs import LungSegmenter

    if lungs_dir is None and not required:
        return None
    try:
        return LungSegmenter.load(Path(lungs_dir or "."), device)
    except FileNotFoundError:
        if required:
            raise
        return None


def prediction_frame(
    model: Any,
    images: Sequence[Image.Image],
    info: dict[str, Any],
    meta: pd.DataFrame,
    device: str = "auto",
    batch_size: int = 32,
) -> pd.DataFrame:
    """``meta`` plus ``prob_<class>``, ``pred`` and, with decomposition, ``prob_sub_*`` and ``pred_hard``."""
    from cxrstudy.training import predict_images

    classes = list(info["classes"])
    probs, sub = predict_images(model, list(images), info, device=device, batch_size=batch_size)
    preds = meta.reset_index(drop=True).copy()
    for j, c in enumerate(classes):
        preds[f"prob_{c}"] = probs[:, j]
    preds["pred"] = [classes[j] for j in probs.argmax(axis=1)]
    subclasses = list(info.get("subclasses") or classes)
    if info.get("decomposition") and subclasses != classes:
        from cxrstudy.decomposition import compose_hard

        for j, s in enumerate(subclasses):
            preds[f"prob_sub_{s}"] = sub[:, j]
        preds["pred_hard"] = [classes[j] for j in compose_hard(sub, subclasses, classes)]
    return preds


def ensemble_frame(
    models: Sequence[Any],
    infos: Sequence[dict[str, Any]],
    images: Sequence[Image.Image],
    meta: pd.DataFrame,
    device: str = "auto",
    batch_size: int = 32,
) -> pd.DataFrame:
    """:func:`prediction_frame` of one model or, for several (a configuration's fold models), ``meta`` plus their
    ensemble (``evaluation.cv.ensemble_rows``: mean class probability, ``pred`` its arg-max, ``pred_hard`` the
    folds' vote); ``n_models`` counts the models."""
    from cxrstudy.evaluation.cv import ensemble_rows

    meta = meta.reset_index(drop=True)
    frames = [prediction_frame(m, images, info, meta, device, batch_size) for m, info in zip(models, infos, strict=True)]
    if len(frames) == 1:
        return frames[0].assign(n_models=1)
    # ensemble_rows groups by "image": number the rows so that a file listed twice stays two rows
    own = [f.drop(columns=list(meta.columns)).assign(image=range(len(meta))) for f in frames]
    ens = ensemble_rows(own, list(infos[0]["classes"])).sort_values("image")
    return pd.concat([meta, ens.drop(columns="image").reset_index(drop=True)], axis=1)


def known_profiles() -> list[str]:
    """Profiles that have a reports folder with saved runs."""
    return sorted(p.parent.name for p in config.REPORTS_DIR.glob("*/runs") if p.is_dir())


def run_dirs(profile_dir: Path) -> dict[str, Path]:
    """Finished runs of a profile (those with run.json and model.pth), by run id."""
    found = {}
    for d in sorted((profile_dir / "runs").glob("*/")):
        if (d / "run.json").is_file() and (d / "model.pth").is_file():
            found[d.name] = d
    return found


@dataclass
class Models:
    """What predicts: one configuration's fold runs (an ensemble, ``id`` its configuration id) or one run
    (``id`` its run id); run folders and run.json records in fold order."""

    id: str
    dirs: list[Path]
    infos: list[dict[str, Any]]

    @property
    def n_models(self) -> int:
        """How many models predict."""
        return len(self.dirs)

    @property
    def run_ids(self) -> list[str]:
        """The member runs' ids."""
        return [str(i.get("run_id") or d.name) for i, d in zip(self.infos, self.dirs, strict=True)]

    @property
    def key(self) -> InputKey:
        """The members' common input (:func:`input_key`); members that differ raise ValueError."""
        keys = {input_key(i) for i in self.infos}
        if len(keys) != 1:
            raise ValueError(f"{self.id}: its runs expect different inputs {sorted(keys)}")
        return keys.pop()

    def load(self) -> list[Any]:
        """The members' trained models (eval mode, CPU)."""
        from cxrstudy.training import load_run_model

        return [load_run_model(d)[0] for d in self.dirs]


def configurations(runs: dict[str, Path]) -> dict[str, Models]:
    """The runs (by run id) grouped into configurations (``evaluation.cv.group_folds``), by configuration id."""
    from cxrstudy.evaluation.cv import group_folds

    loaded = [{"dir": d, "info": json.loads((d / "run.json").read_text())} for d in runs.values()]
    return {
        cid: Models(cid, [m["dir"] for m in members], [m["info"] for m in members])
        for cid, members in group_folds(loaded).items()
    }


def single_runs(runs: dict[str, Path]) -> dict[str, Models]:
    """Each run as its own one-model :class:`Models`, by run id."""
    return {rid: Models(rid, [d], [json.loads((d / "run.json").read_text())]) for rid, d in runs.items()}


def headline_run(profile_dir: Path) -> str | None:
    """The configuration (or run) the evaluation chose on validation: ``results.json``'s headline ``config_id``
    or ``run_id``, whichever is present; None without one."""
    path = profile_dir / "results.json"
    if not path.is_file():
        return None
    head = json.loads(path.read_text()).get("headline") or {}
    return head.get("config_id") or head.get("run_id")


def choose_models(profile: str, run: str | None = None, reports_dir: Path | None = None) -> Models:
    """What predicts for ``run``: a run id gives that run's model, a configuration id its fold models' ensemble;
    default: the ensemble of the headline's configuration (``results.json``). Errors name what exists instead."""
    pdir = (reports_dir or config.REPORTS_DIR) / profile
    runs = run_dirs(pdir)
    if not runs:
        known = ", ".join(known_profiles()) or "none yet"
        raise FileNotFoundError(
            f"profile {profile!r} has no saved runs under {pdir / 'runs'} (profiles with runs: {known}); "
            f"run `make reproduce PROFILE={profile}` first"
        )
    configs = configurations(runs)
    choices = f"its configurations: {', '.join(configs)}; its runs: {', '.join(runs)}"
    if run is not None:
        if run in runs:
            return single_runs({run: runs[run]})[run]
        if run in configs:
            return configs[run]
        raise FileNotFoundError(f"profile {profile!r} has no run or configuration {run!r}; {choices}")
    head = headline_run(pdir)
    if head is None:
        raise FileNotFoundError(f"profile {profile!r} has no results.json naming a headline; pick one with --run: {choices}")
    if head in runs:  # a headline named by one fold run: its configuration
        head = RunSpec.from_record(json.loads((runs[head] / "run.json").read_text())).config_id
    if head not in configs:
        raise FileNotFoundError(f"profile {profile!r}: the headline {head!r} of results.json has no saved runs; {choices}")
    return configs[head]
