"""``make bench`` (scripts/bench.py): one tiny run end to end and the keys of reports/bench.json (a contract)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrstudy import config, tensorcache
from cxrstudy.data.manifest import MANIFEST_COLUMNS

ROOT = Path(__file__).resolve().parents[1]

#: The keys other tools read from reports/bench.json.
CONTRACT = {
    "feature_extraction_img_s",
    "bare_forward_fp32_img_s",
    "bare_forward_bf16_img_s",
    "bare_forward_img_s",
    "pipeline_ratio",
    "train_img_s",
    "bare_train_img_s",
    "train_pipeline_ratio",
    "peak_rss_mb",
    "runtime_env",
    "machine",
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cxr_bench", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_tiny_bench_writes_the_contract(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_NO_REEXEC", "1")  # no re-exec of the test process
    monkeypatch.setattr(tensorcache, "DEFAULT_CACHE_DIR", tmp_path / "tensors")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        rel = f"images/x/{i}.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 44)) * 255).astype(np.uint8)).save(tmp_path / rel)
        rows.append(dict.fromkeys(MANIFEST_COLUMNS, "") | {"image": rel, "label": ("covid", "normal")[i % 2],
                                                            "split": "train", "sha256": str(i)})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "bench.json"
    args = ["--image-size", "32", "--batch-size", "4", "--n-images", "12", "--rounds", "2"]
    args += ["--train-rounds", "1", "--train-batches", "1", "--device", "cpu", "--threads", "1"]
    args += ["--manifest", str(tmp_path / "manifest.csv"), "--image-root", str(tmp_path), "--out", str(out)]
    old_threads = torch.get_num_threads()
    try:
        bench.main(args)
    finally:
        torch.set_num_threads(old_threads)
    rec = json.loads(out.read_text())
    assert CONTRACT <= set(rec)
    assert set(rec["train_img_s"]) == set(config.SCENARIOS) and all(
        v > 0 for v in rec["train_img_s"].values()
    )
    assert rec["pipeline_ratio"] == pytest.approx(
        rec["feature_extraction_img_s"] / rec["bare_forward_img_s"], 0.01
    )
    assert rec["train_pipeline_ratio"] == pytest.approx(
        rec["train_img_s"]["deep"] / rec["bare_train_img_s"], 0.01
    )
    bf16 = rec["bare_forward_bf16_img_s"]
    assert (bf16 is None) == (not rec["machine"]["bf16_native"])
    chosen = bf16 if rec["feature_precision"] == "bf16" else rec["bare_forward_fp32_img_s"]
    assert rec["bare_forward_img_s"] == chosen
    assert set(rec["runtime_env"]) == set(config.RUNTIME_ENV)
    m = rec["machine"]
    assert {"cpu_model", "cpu_count", "torch", "loadavg_start", "loadavg_end"} <= set(m)
    assert len(m["loadavg_start"]) == len(m["loadavg_end"]) == 3 and rec["peak_rss_mb"] > 0
    assert len(rec["rounds"]["feature_extraction_img_s"]) == 2


def test_bench_re_executes_itself_with_the_allocator_settings(bench):
    src = (ROOT / "scripts" / "bench.py").read_text()
    main = src[src.index("def main(") :]
    assert main.index("config.reexec_with_runtime_env()") < main.index("parse_args(")
