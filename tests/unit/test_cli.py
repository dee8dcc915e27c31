"""`pema-tenant` end to end on tiny model folders: user errors and the happy path.

Every user error must exit 2 with exactly one `pema-tenant: error:` line on stderr, no traceback,
and leave nothing behind in --out (no folder, no hidden temporary `.out.*` beside it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tenant.cli import main

PREFIX = "pema-tenant: error:"
REPO = Path(__file__).resolve().parents[2]

TRAIN_ROWS = [
    ("In the beginning God created the heaven and the earth.", "In the beginning, God created."),
    ("And God said, Let there be light.", "God said, Let there be light."),
    ("Thou shalt not steal.", "You shall not steal."),
    ("Wherefore art thou come hither?", "Why have you come here?"),
    ("And he said unto them, Go ye.", "He said to them, Go."),
    ("Blessed are the meek.", "Blessed are the gentle."),
    ("Hear, O Israel.", "Hear, Israel."),
    ("He maketh me to lie down.", "He makes me lie down."),
    ("The LORD is my shepherd.", "The LORD is my shepherd."),
    ("Thy word is a lamp unto my feet.", "Your word is a lamp to my feet."),
]


def _write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in rows))
    return path


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    # Whatever a command writes to a cache goes to this test's folder.
    monkeypatch.setenv("PEMA_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "data"
    d.mkdir()
    files = {
        "train": _write_tsv(d / "train.tsv", TRAIN_ROWS),
        "valid": _write_tsv(d / "valid.tsv", TRAIN_ROWS[:3]),
        "missing": d / "absent.tsv",
        "nocolumn": d / "nocolumn.tsv",
        "empty": d / "empty.tsv",
        "malformed": d / "malformed.tsv",
        "long": _write_tsv(d / "long.tsv", [("And it came to pass in those days " * 6, "Then.")]),
    }
    files["nocolumn"].write_text("source\ttranslation\na\tb\n")
    files["empty"].write_text("source\ttarget\n")
    files["malformed"].write_text("source\ttarget\na\tb\nthree\tfields\there\n")
    return files


def _assert_one_error_line(stderr: str, strict: bool = True) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(PREFIX)]
    assert len(errors) == 1, stderr
    if strict:
        assert lines == errors, f"more than the error line on stderr: {stderr!r}"
    return errors[0]


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def _train_args(data: dict[str, Path], train: Path, out: Path, model: Path) -> list[str]:
    return [
        "train",
        "--train", str(train),
        "--valid", str(data["valid"]),
        "--out", str(out),
        "--model", str(model),
        "--epochs", "1",
        "--rct-epochs", "1",
        "--max-pairs", "8",
        "--no-cache",
        "--threads", "1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "no such file"),
        ("nocolumn", "target"),
        ("empty", "no data rows"),
        ("malformed", "malformed row"),
        ("long", "limit of 64"),
        ("no-model", "not a Hugging Face model folder"),
    ],
)
@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "bars"])
def test_train_user_errors(
    case: str,
    expected: str,
    quiet: bool,
    data: dict[str, Path],
    short_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "runs" / "adapter"
    out.parent.mkdir()
    train = data["train"] if case == "no-model" else data[case]
    model = tmp_path / "no-such-model" if case == "no-model" else short_model_dir
    args = _train_args(data, train, out, model) + (["--quiet"] if quiet else [])
    assert main(args) == 2
    captured = capsys.readouterr()
    # With --quiet the error is all there is; otherwise a progress bar may precede it.
    line = _assert_one_error_line(captured.err, strict=quiet)
    assert expected in line
    assert captured.out == ""
    _assert_nothing_left(out)


@pytest.mark.parametrize(
    ("device", "expected"),
    [("gpu", "auto, cpu or cuda[:N]"), ("cuda:7", "CUDA device")],
)
def test_train_device_errors(
    device: str,
    expected: str,
    data: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = tmp_path / "adapter"
    args = _train_args(data, data["train"], out, tiny_model_dir)
    assert main([*args, "--device", device, "--quiet"]) == 2
    captured = capsys.readouterr()
    assert expected in _assert_one_error_line(captured.err)
    _assert_nothing_left(out)


def test_max_pairs_below_one_is_a_usage_error(
    data: dict[str, Path], short_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adapter"
    args = _train_args(data, data["train"], out, short_model_dir)
    args[args.index("--max-pairs") + 1] = "0"
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--max-pairs" in err
    _assert_nothing_left(out)


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("pema-tenant")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tenant.cli"]


def test_real_process_user_error(
    data: dict[str, Path], short_model_dir: Path, tmp_path: Path
) -> None:
    """One real run of the console script: the over-long sequence, found after the model loads."""
    out = tmp_path / "adapter"
    env = {**os.environ, "PEMA_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [*_cli_command(), *_train_args(data, data["long"], out, short_model_dir), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "limit of 64" in _assert_one_error_line(proc.stderr)
    assert proc.stdout == ""
    _assert_nothing_left(out)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[Path, Path, Path]:
    """Train once through the CLI; several tests use the adapter."""
    root = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("PEMA_CACHE_DIR", str(root / "cache"))
    try:
        train = _write_tsv(root / "train.tsv", TRAIN_ROWS)
        valid = _write_tsv(root / "valid.tsv", TRAIN_ROWS[:3])
        out = root / "adapter"
        args = _train_args({"valid": valid}, train, out, tiny_model_dir)
        assert main([*args, "--rank", "8", "--batch-size", "32", "--quiet"]) == 0
    finally:
        mp.undo()
    return out, valid, root


def test_train_writes_adapter(trained: tuple[Path, Path, Path], tiny_model_dir: Path) -> None:
    from pema.adapter import load_adapter
    from pema.models import model_revision

    out, _, root = trained
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".adapter.")] == []
    adapter, doc = load_adapter(out, model_revision=model_revision(tiny_model_dir))
    assert adapter.config.hidden_size == 32 and adapter.config.rank == 8
    assert doc["training"]["train_pairs"] == 8
    # --no-cache: no memory was stored; the cache holds at most the recorded dtype choice.
    cached = {p.name for p in (root / "cache").iterdir()} if (root / "cache").exists() else set()
    assert cached <= {"dtype-choices.json"}


def test_evaluate_json(
    trained: tuple[Path, Path, Path], tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, valid, _ = trained
    args = ["evaluate", "--adapter", str(out), "--test", str(valid), "--model", str(tiny_model_dir)]
    assert main([*args, "--limit", "2", "--json", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    for key in ("bleu", "chrf", "zero_shot_bleu", "zero_shot_chrf"):
        assert isinstance(result[key], float) and 0 <= result[key] <= 100
    assert result["n"] == 2


def test_generate_one_line_per_text(
    trained: tuple[Path, Path, Path], tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, _ = trained
    texts = ["Thou art my son.", "Go ye therefore.", "Amen."]
    args = ["generate", "--adapter", str(out), "--model", str(tiny_model_dir), *texts]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert stdout.endswith("\n")
    assert len(stdout.split("\n")) == len(texts) + 1, repr(stdout)


def test_adapter_errors(
    trained: tuple[Path, Path, Path],
    short_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, valid, _ = trained
    # Another model (another revision) than the adapter was trained on.
    args = ["generate", "--adapter", str(out), "--model", str(short_model_dir), "hello"]
    assert main(args) == 2
    assert "revision" in _assert_one_error_line(capsys.readouterr().err)
    # No adapter at all.
    args = ["evaluate", "--adapter", str(tmp_path / "none"), "--test", str(valid)]
    assert main([*args, "--model", str(short_model_dir), "--quiet"]) == 2
    assert "not an adapter folder" in _assert_one_error_line(capsys.readouterr().err)
