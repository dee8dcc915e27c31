"""End to end on the real default model and real data: the CLI trains an adapter on a small
kjv_web slice, and the adapter beats the untuned model on chrF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pema.data import shared_data_dir

DATA = shared_data_dir() / "kjv_web"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present"),
]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "tenant.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )


def test_trained_adapter_beats_untuned_model_on_chrf(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    train = _cli(
        "train",
        "--train", str(DATA / "train.tsv"),
        "--valid", str(DATA / "valid.tsv"),
        "--out", str(out),
        "--max-pairs", "200",
        "--max-valid-pairs", "16",
        "--epochs", "2",
        "--no-cache",
        "--quiet",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["training"]["train_pairs"] == 200
    assert config["training"]["valid"]["top1"] > config["training"]["valid"]["model_top1"]

    evaluate = _cli(
        "evaluate", "--adapter", str(out), "--test", str(DATA / "test.tsv"),
        "--limit", "24", "--json", "--quiet",
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr
    result = json.loads(evaluate.stdout)
    assert result["n"] == 24
    assert result["chrf"] > result["untuned_chrf"], result
