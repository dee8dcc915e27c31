"""`pema-peers train-eval` end to end on a tiny model folder: every method trains and scores from
the command line, and user errors exit 2 with one `pema-peers: error:` line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pema.peers.cli import METHODS, main

PREFIX = "pema-peers: error:"
ROWS = [
    ("In the beginning God created the heaven and the earth.", "In the beginning, God created."),
    ("And God said, Let there be light.", "God said, Let there be light."),
    ("Thou shalt not steal.", "You shall not steal."),
    ("Wherefore art thou come hither?", "Why have you come here?"),
]
SMALL = ["--epochs", "1", "--batch-size", "2", "--rank", "2", "--k", "16", "--mixture", "2"]


@pytest.fixture
def tsv(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.tsv"
    path.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in ROWS))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["train-eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_scores(
    method: str, tsv: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "--method", method, "--train", str(tsv), "--test", str(tsv), "--limit", "2",
        "--model", str(tiny_model_dir), *SMALL,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == method and result["test_pairs"] == 2
    assert 0 <= result["chrf"] <= 100 and 0 <= result["bleu"] <= 100
    if method in ("untuned", "copy"):
        assert result.get("trainable_params", 0) == 0 and "steps" not in result
        return
    assert result["steps"] == 2 and result["trainable_params"] > 0  # 4 pairs, batch 2, 1 epoch
    if method in ("slash", "jrwarp"):
        assert result["trainable_params"] == 16


def test_adamix_serves_a_lora_sized_module(
    tsv: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "--train",
        str(tsv),
        "--test",
        str(tsv),
        "--limit",
        "1",
        "--model",
        str(tiny_model_dir),
    ]
    results = {}
    for method in ("lora", "adamix"):
        code, out, err = run(capsys, "--method", method, *common, *SMALL)
        assert code == 0, err
        results[method] = json.loads(out)
    lora, adamix = results["lora"], results["adamix"]
    assert adamix["trainable_params"] > lora["trainable_params"]  # the mixture trains copies
    assert adamix["served_params"] == lora["served_params"] == lora["trainable_params"]


def test_private_training_reports_epsilon(
    tsv: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "--method", "jrwarp", "--train", str(tsv), "--test", str(tsv), "--limit", "1",
        "--model", str(tiny_model_dir), "--dp-epsilon", "8", *SMALL,
    )  # fmt: skip
    assert code == 0, err
    privacy = json.loads(out)["privacy"]
    assert 0 < privacy["epsilon_spent"] <= 8 and privacy["target_delta"] == 1 / (2 * 4)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "lora", "--dp-epsilon", "3"], "--dp-epsilon is implemented for"),
        (["--method", "lora", "--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--method", "copy", "--train", "/nonexistent.tsv"], "/nonexistent.tsv"),
        (["--method", "lora", "--targets", "nonexistent"], "--targets nonexistent: no such module"),
        (["--method", "adamix", "--targets", "nonexistent"], "no linear layer named"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    flags: list[str],
    message: str,
    tsv: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = {"--train": str(tsv), "--test": str(tsv), "--model": str(tiny_model_dir)}
    given = dict(zip(flags[::2], flags[1::2], strict=True))
    argv = [x for k, v in {**base, **given}.items() for x in (k, v)]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and message in lines[0], err


@pytest.mark.parametrize("flag", ["--epochs", "--k", "--lr", "--dp-epsilon"])
def test_non_positive_numbers_are_refused_at_parsing(
    flag: str, tsv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "--method", "lora", "--train", str(tsv), "--test", str(tsv), flag, "0")
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err
