"""The matched harness (benchmarks.compare): every method is generated under the same conditions.

A tiny random Llama stands in for the model; the harness's own cells run in-process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import KJV, make_tiny_llama

from benchmarks.compare import (
    METHODS,
    Protocol,
    build_memory_cell,
    cell_key,
    plan,
    run_cell,
)
from benchmarks.compare_report import matched, task_rows
from pema.backbone import FrozenLM
from pema.data import read_pairs
from pema.evaluation import GenerationTrace, paired_bootstrap, pema_decoder, translate_with
from pema.peers.sft import HFPeer, pad_id_of, peer_decoder
from pema.prompts import TASK_TEMPLATES, PromptFormat


def test_untuned_through_pema_and_peer_paths_is_one_generation(tokenizer) -> None:
    """The frozen model through PEMA's decode session and through a peer's own greedy loop gives
    the same tokens and the same trace: the two decoders differ only in where scores come from."""
    fmt = PromptFormat(tokenizer, TASK_TEMPLATES["kjv_web"])
    sources = [p.source for p in read_pairs(KJV / "valid.tsv", 5)]
    lm = FrozenLM(make_tiny_llama(tokenizer, seed=3, init_std=0.2), "tiny", "r")
    peer = HFPeer(make_tiny_llama(tokenizer, seed=3, init_std=0.2), lm.model.config)
    traces = [GenerationTrace(), GenerationTrace()]
    a = translate_with(pema_decoder(lm), fmt, sources, 1.2, 2, trace=traces[0])
    b = translate_with(peer_decoder(peer, pad_id_of(fmt)), fmt, sources, 1.2, 2, trace=traces[1])
    assert a == b
    assert traces[0].digest() == traces[1].digest()
    # The digest sees a change of any condition: batches, caps (via ρ) or rows.
    for batch, rho, rows in ((3, 1.2, sources), (2, 2.0, sources), (2, 1.2, sources[:4])):
        other = GenerationTrace()
        translate_with(pema_decoder(lm), fmt, rows, rho, batch, trace=other)
        assert other.digest() != traces[0].digest()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    data = tmp_path_factory.mktemp("data")
    for split, n in (("train", 8), ("valid", 6), ("test", 4)):
        lines = (KJV / f"{split}.tsv").read_text().splitlines()[: n + 1]
        (data / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return Protocol(
        task="kjv_web",
        model=str(tiny_model_dir),
        data=str(data),
        train_pairs=8,
        select_pairs=3,
        stop_pairs=3,
        test_pairs=4,
        max_epochs=1,
        max_tokens=96,
        batch_size=3,
    )


METHODS_UNDER_TEST = [
    "copy",
    "untuned",
    "pema",
    "pema-paper",
    "pema-mix",
    "lora",
    "slash",
    "jrwarp-dp8",
]


def test_every_method_gets_the_same_rows_cap_dtype_and_stop_rule(
    harness: Protocol, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEMA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PEMA_DTYPE", "float32")
    build_memory_cell(harness, "teacher-forced")
    cells = {m: run_cell(harness, m, 0) for m in METHODS_UNDER_TEST}
    for cell in cells.values():
        assert len(cell["test"]["outputs"]) == harness.test_pairs
    model_cells = {k: c for k, c in cells.items() if k != "copy"}
    digests = {c["test"]["trace"] for c in model_cells.values()}
    assert len(digests) == 1, {k: c["test"]["trace"] for k, c in model_cells.items()}
    # Valid-prefix choices are made on the same rows under the same conditions too.
    select = {s["trace"] for c in model_cells.values() for s in c["select"].values()}
    assert len(select) == 1
    # Trained methods ran the same epoch budget.
    assert {c["epochs_run"] for k, c in cells.items() if k in ("pema", "lora", "slash")} == {1}
    # The report keeps matched cells and leaves out one whose generation differed.
    entry = {"protocol": {}, "cells": {k: cells[k] for k in cells}}
    assert matched(entry["cells"])[1] == []
    doctored = {**cells["lora"], "test": {**cells["lora"]["test"], "trace": "something-else"}}
    entry["cells"]["lora/seed0"] = doctored
    assert matched(entry["cells"])[1] == ["lora/seed0"]
    refs = [p.target for p in read_pairs(Path(harness.data) / "test.tsv", harness.test_pairs)]
    assert "lora/seed0" not in {r["key"] for r in task_rows(entry, refs)}


def test_plan_runs_the_core_first_then_further_seeds() -> None:
    order = plan(["slash", "lora", "pema", "untuned", "copy"], [0, 1])
    assert order[:4] == [("copy", 0), ("untuned", 0), ("pema", 0), ("lora", 0)]
    assert order[-3:] == [("pema", 1), ("lora", 1), ("slash", 1)]
    assert cell_key("copy", 0) == "copy" and cell_key("lora", 1) == "lora/seed1"
    assert all(m in METHODS for m, _ in order)


def test_paired_bootstrap_interval() -> None:
    refs = ["the cat sat on the mat", "a dog ran far", "hello there world"] * 10
    worse = ["the cat", "a dog", "hello"] * 10
    up = paired_bootstrap(refs, worse, refs)
    assert up["delta"] > 0 and up["low"] > 0 and up["significant"]
    same = paired_bootstrap(worse, worse, refs)
    assert same == {"delta": 0.0, "low": 0.0, "high": 0.0, "significant": False}
    with pytest.raises(ValueError):
        paired_bootstrap(refs, worse[:3], refs)


def test_error_analysis_counts_why_outputs_lose_to_copying() -> None:
    from benchmarks.compare_report import error_analysis
    from pema.data import Pair

    pairs = [
        Pair("And God said unto thee", "And God said to you"),
        Pair("Let there be light in the firmament", "Let there be lights in the sky"),
        Pair("He went up into the mountain", "He went up onto the mountain"),
        Pair("Blessed are the meek", "Blessed are the gentle"),
    ]
    outputs = [
        "het het het het het het het het het het het",  # run-on
        "Let",  # cut short
        "Zij ging naar boven op de berg",  # off source
        "Blessed are the meek",  # as good as copying: not counted
    ]
    assert error_analysis(outputs, pairs) == {
        "rows": 4,
        "loses_to_copy": 3,
        "run_on": 1,
        "cut_short": 1,
        "off_source": 1,
        "substitutions": 0,
    }


def test_two_runs_saving_one_results_file_keep_each_others_cells(tmp_path: Path) -> None:
    from benchmarks.compare import Store

    path = tmp_path / "compare.json"
    p = Protocol("kjv_web")
    first, second = Store(path), Store(path)  # both read the file before either wrote
    first.task(p)["cells"]["copy"] = {"test": {"chrf": 1.0}}
    first.save()
    second.task(p)["cells"]["untuned"] = {"test": {"chrf": 2.0}}
    second.save()
    assert set(Store(path).task(p)["cells"]) == {"copy", "untuned"}
    assert [f.name for f in tmp_path.iterdir()] == ["compare.json"]  # no temporaries left


def test_learning_curve_points_sit_beside_the_default_entry_and_are_reported(
    tmp_path: Path,
) -> None:
    from benchmarks.compare import Store, rows, task_key
    from benchmarks.compare_report import write_report

    path = tmp_path / "compare.json"
    base = Protocol("kjv_web", test_pairs=20)
    more = Protocol("kjv_web", train_pairs=5000, max_epochs=1, test_pairs=20)
    assert (task_key(base), task_key(more)) == ("kjv_web", "kjv_web-n5000-e1")
    test = rows(base).test
    store = Store(path)
    for p, chrf in ((base, 40.0), (more, 50.0)):
        cells = store.task(p)["cells"]
        cells["copy"] = {"method": "copy", "label": "copy", "seed": 0,
                         "test": {"chrf": 60.0, "bleu": 30.0, "outputs": [x.source for x in test]}}  # fmt: skip
        cells["pema/seed0"] = {"method": "pema", "label": "PEMA", "seed": 0,
                               "test": {"chrf": chrf, "bleu": 20.0,
                                        "outputs": [x.target for x in test]}}  # fmt: skip
    store.save()
    doc = Store(path).doc
    assert {k for k in doc if k != "machine"} == {"kjv_web", "kjv_web-n5000-e1"}
    write_report(doc, tmp_path)
    md = (tmp_path / "compare.md").read_text()
    curve = md[md.index("## kjv_web: learning curve") :]
    assert "| 1000 | 2 | pema | 0 |" in curve and "| 40.0 |" in curve
    assert "| 5000 | 1 | pema | 0 |" in curve and "| 50.0 |" in curve
    # The main table prices each row against the default, from the outputs: here PEMA's are
    # the references themselves, so copying the source is well below it.
    copy_row = next(x for x in md.splitlines() if x.startswith("| copy |"))
    assert copy_row.split("|")[-2].strip().startswith("-")
    assert (tmp_path / "curve-kjv_web.png").is_file()


def test_another_models_cells_sit_beside_the_default_models(tmp_path: Path) -> None:
    from benchmarks.compare import Store, task_key

    path = tmp_path / "compare.json"
    default, gemma = Protocol("kjv_web"), Protocol("kjv_web", model="/models/gemma-3-270m")
    assert task_key(gemma) == "kjv_web-gemma-3-270m"
    store = Store(path)
    store.task(default)["cells"]["copy"] = {"test": {"chrf": 1.0}}
    store.task(gemma)["cells"]["copy"] = {"test": {"chrf": 2.0}}
    store.save()
    doc = Store(path).doc
    assert doc["kjv_web"]["cells"]["copy"]["test"]["chrf"] == 1.0
    assert doc["kjv_web-gemma-3-270m"]["cells"]["copy"]["test"]["chrf"] == 2.0


def test_a_run_under_another_protocol_refuses_and_keeps_the_cells(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.compare import Store, main

    path = tmp_path / "compare.json"
    store = Store(path)
    store.task(Protocol("kjv_web"))["cells"]["copy"] = {"test": {"chrf": 1.0}}
    store.save()
    before = path.read_bytes()
    argv = ["--tasks", "kjv_web", "--methods", "copy", "--test-pairs", "20", "--results", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "test_pairs 200 -> 20" in err and "1 cells" in err
    assert path.read_bytes() == before
