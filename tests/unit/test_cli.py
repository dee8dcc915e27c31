"""`pema-tenant` end to end on tiny model folders: user errors and the happy path.

Every user error must exit 2 with exactly one `pema-tenant: error:` line on stderr, no traceback,
and leave nothing behind in --out (no folder, no hidden temporary `.out.*` beside it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pema.settings import PriorChoice, prior_label
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
        "--train",
        str(train),
        "--valid",
        str(data["valid"]),
        "--out",
        str(out),
        "--model",
        str(model),
        "--epochs",
        "1",
        "--rct-epochs",
        "1",
        "--max-pairs",
        "8",
        "--no-cache",
        "--threads",
        "1",
    ]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "no such file"),
        ("nocolumn", "target"),
        ("empty", "no data rows"),
        ("malformed", "malformed row"),
        ("long", "long.tsv:2: 89 tokens (prompt + target) exceed the model's limit of 64"),
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
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
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
    for key in ("bleu", "chrf", "untuned_bleu", "untuned_chrf"):
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


# -- fast, documented argument parsing --------------------------------------------------------

HEAVY = ["torch", "transformers", "peft", "grpc"]
PARSE_WITHOUT_LOADING = """
import json, sys, time
start = time.perf_counter()
from {module} import build_parser
try:
    build_parser().parse_args({argv!r})
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
print(json.dumps([code, heavy, time.perf_counter() - start]))
"""


def parse_in_fresh_process(module: str, argv: list[str]) -> tuple[int, list[str], float, str]:
    """Parse argv with a CLI's parser in a new interpreter: exit code, heavy modules it loaded,
    seconds (import + parse), stderr."""
    code = PARSE_WITHOUT_LOADING.format(module=module, argv=argv, heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    status, heavy, seconds = json.loads(proc.stdout.strip().splitlines()[-1])
    return status, heavy, seconds, proc.stderr


CLI_MODULES = ["tenant.cli", "coordinator.cli", "pema.peers.cli"]
VALID_ARGS = {
    "tenant.cli": ["train", "--train", "a.tsv", "--valid", "b.tsv", "--out", "o", "--epochs", "2"],
    "coordinator.cli": ["serve", "--log-level", "debug", "--port", "0"],
    "pema.peers.cli": ["train-eval", "--method", "lora", "--train", "a", "--test", "b"],
}


@pytest.mark.parametrize("module", CLI_MODULES)
def test_parsing_loads_no_model_library(module: str) -> None:
    """--help and every usage error answer before torch/transformers load (they take seconds)."""
    status, heavy, seconds, _ = parse_in_fresh_process(module, VALID_ARGS[module])
    assert (status, heavy) == (0, []), seconds
    status, heavy, seconds, _ = parse_in_fresh_process(module, ["--help"])
    assert (status, heavy) == (0, [])
    assert seconds < 1.0  # measured ~0.1 s; the machine may be shared


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_parsers(sub)
    return found


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_flag_has_help_and_shows_its_default(module: str) -> None:
    parser = importlib.import_module(module).build_parser()
    for p in _all_parsers(parser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{p.prog} {action.dest}: no help text"
        text = p.format_help()
        for action in p._actions:
            shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
            if shown and action.dest not in ("help", "version"):
                default = repr(action.default) if "\n" in str(action.default) else action.default
                assert f"(default: {default})" in " ".join(text.split()), (
                    p.prog,
                    action.dest,
                )


@pytest.mark.parametrize("module", CLI_MODULES)
def test_version(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert (
        out.startswith(("pema-tenant ", "pema-coordinator ", "pema-peers "))
        and len(out.split()) == 2
    )


@pytest.mark.parametrize(
    ("module", "argv", "expected"),
    [
        ("tenant.cli", [*VALID_ARGS["tenant.cli"][:-1], "0"], "--epochs: must be at least 1"),
        ("tenant.cli", ["generate", "--adapter", "a", ""], "text: must not be empty"),
        ("tenant.cli", ["generate", "--adapter", "a", "ok", "  "], "text: must not be empty"),
        ("coordinator.cli", ["serve", "--log-level", "LOUD"], "--log-level: must be one of"),
        ("coordinator.cli", ["serve", "--port", "70000"], "--port: must be a port number"),
        ("pema.peers.cli", [*VALID_ARGS["pema.peers.cli"], "--epochs", "0"], "--epochs"),
    ],
)
def test_usage_errors_are_one_line_exit_2(module: str, argv: list[str], expected: str) -> None:
    status, heavy, _, stderr = parse_in_fresh_process(module, argv)
    assert (status, heavy) == (2, [])
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and expected in lines[0], stderr


def test_out_is_not_overwritten_without_force(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, valid, _ = trained
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["train", "--train", str(valid), "--valid", str(valid), "--out", str(out)]
    assert main([*args, "--quiet"]) == 2
    assert "--force" in _assert_one_error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A folder holding something else is never replaced, even with --force.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    args = ["train", "--train", str(valid), "--valid", str(valid), "--out", str(other)]
    assert main([*args, "--force", "--quiet"]) == 2
    assert "holds no adapter" in _assert_one_error_line(capsys.readouterr().err)
    assert (other / "todo.txt").read_text() == "keep me"


def test_force_replaces_the_adapter(
    data: dict[str, Path], short_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    args = [*_train_args(data, data["train"], out, short_model_dir), "--quiet"]
    assert main(args) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    assert main([*args, "--seed", "1", "--force"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != first


def test_evaluate_without_untuned_baseline(
    trained: tuple[Path, Path, Path], tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, valid, _ = trained
    args = ["evaluate", "--adapter", str(out), "--test", str(valid), "--model", str(tiny_model_dir)]
    assert main([*args, "--limit", "2", "--no-untuned", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "bleu" in result and not [k for k in result if k.startswith(("untuned", "zero"))]
    assert main([*args, "--limit", "2", "--no-untuned", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "PEMA adapter" in text and "untuned" not in text


def test_adapters_list_show_delete(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out, _, _ = trained
    copy = tmp_path / "runs" / "acme" / "kjv"
    shutil.copytree(out, copy)
    assert main(["adapters", "list", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert str(copy) in listing and "8" in listing  # rank 8, 8 training pairs
    assert main(["adapters", "show", str(copy)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tensors"]["A"] == [8, 32] and shown["format"] == 2
    assert shown["weights_metadata"]["pema_format_version"] == "2"
    assert main(["adapters", "delete", str(copy), str(tmp_path)]) == 2  # one is no adapter
    assert "not an adapter folder" in _assert_one_error_line(capsys.readouterr().err)
    assert copy.is_dir()
    assert main(["adapters", "delete", str(copy)]) == 0
    assert not copy.exists() and "deleted" in capsys.readouterr().out


def test_cache_list_and_clear(
    data: dict[str, Path], short_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _train_args(data, data["train"], tmp_path / "ad", short_model_dir)
    args.remove("--no-cache")
    assert main([*args, "--tenant", "acme", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["cache", "list", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(entries) == 2  # the train and the valid memory
    assert {e["tenant"] for e in entries} == {"acme"} and all(e["complete"] for e in entries)
    assert sorted(e["pairs"] for e in entries) == [3, 8]
    assert all(e["spec"]["mode"] == "teacher-forced" and e["bytes"] > 0 for e in entries)
    assert main(["cache", "list"]) == 0
    assert "2 memories" in capsys.readouterr().out
    assert main(["cache", "clear", "--tenant", "acme", "--address", entries[0]["address"]]) == 0
    assert "deleted 1 cached memories" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert main(["cache", "list"]) == 0
    assert "no cached memories" in capsys.readouterr().out


def _small_train(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], Path]:
    """`train` arguments on TRAIN_ROWS (its first 3 rows as valid), a cache of its own."""
    monkeypatch.setenv("PEMA_CACHE_DIR", str(tmp_path / "cache"))
    train = _write_tsv(tmp_path / "train.tsv", TRAIN_ROWS)
    valid = _write_tsv(tmp_path / "valid.tsv", TRAIN_ROWS[:3])
    out = tmp_path / "adapter"
    return _train_args({"valid": valid}, train, out, model), out


def test_train_chooses_the_source_prior_on_valid_by_default(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pema.adapter import load_adapter

    args, out = _small_train(tmp_path, tiny_model_dir, monkeypatch)
    assert main([*args, "--rank", "4", "--quiet"]) == 0
    assert "source priors chosen on valid: β" in capsys.readouterr().out
    adapter, doc = load_adapter(out)
    chrf = doc["training"]["source_prior_valid_chrf"]
    grid = {prior_label(*g): g for g in PriorChoice.grid}
    beta, gamma = grid[max(chrf, key=lambda g: (chrf[g], -sum(grid[g])))]
    assert set(chrf) == set(grid)
    assert (adapter.config.source_prior, adapter.config.copy_prior) == (beta, gamma)
    assert adapter.config.lambda_max == (1.0 if beta + gamma > 0 else 0.25)
    # Chosen, then kept as chosen.
    for param, value in ((adapter.source_beta, beta), (adapter.copy_beta, gamma)):
        assert (param is None) == (value == 0)
        assert param is None or float(param.detach()) == value
    # The trained adapter is saved only where it clearly beats its start on valid (the
    # difference's interval above 0); else the start is.
    gate, kept = doc["training"]["valid_chrf"], doc["training"]["kept"]
    assert gate["start"] == chrf[prior_label(beta, gamma)]
    assert kept == ("trained" if gate["interval"][0] > 0 else "start")
    assert (float(adapter.B_pd.abs().sum()) > 0) == (kept == "trained")
    # The summary's validation figures are the saved adapter's.
    assert ("trained_valid" in doc["training"]) == (kept == "start")


def test_the_priors_are_chosen_together_or_set_together(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args, out = _small_train(tmp_path, tiny_model_dir, monkeypatch)
    for half in (["--source-prior", "2"], ["--copy-prior", "4"]):
        assert main([*args, *half, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "chosen together" in err and "Traceback" not in err
        assert not out.exists()


def test_train_with_a_source_prior_then_generate(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pema.adapter import load_adapter

    args, out = _small_train(tmp_path, tiny_model_dir, monkeypatch)
    priors = ["--source-prior", "2.5", "--copy-prior", "3", "--fixed-source-prior"]
    assert main([*args, "--rank", "4", *priors, "--quiet"]) == 0
    adapter, _ = load_adapter(out)
    assert (adapter.config.source_prior, adapter.config.copy_prior) == (2.5, 3.0)
    assert float(adapter.source_beta.detach()) == 2.5  # type: ignore[union-attr]
    assert float(adapter.copy_beta.detach()) == 3.0  # type: ignore[union-attr]
    capsys.readouterr()
    # Generation feeds each text's own tokens to the prior.
    assert main(["generate", "--adapter", str(out), "--model", str(tiny_model_dir), "Amen."]) == 0
    assert capsys.readouterr().out.count("\n") == 1
