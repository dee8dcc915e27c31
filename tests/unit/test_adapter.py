"""The PEMA adapter: shapes, parameter counts, checkpoints (round trip, revision check, atomicity)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pema.adapter
from pema.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterConfig,
    PemaAdapter,
    count_parameters,
    load_adapter,
    save_adapter,
)
from pema.errors import AdapterError


@pytest.mark.parametrize(
    ("hidden", "rank", "each"), [(576, 512, 294_912), (2048, 512, 1_048_576), (32, 8, 256)]
)
def test_parameter_counts(hidden: int, rank: int, each: int) -> None:
    counts = count_parameters(PemaAdapter(AdapterConfig(hidden_size=hidden, rank=rank)))
    assert counts == {"A": each, "B_rct": each, "B_pd": each}


def test_shapes_and_init() -> None:
    adapter = PemaAdapter(AdapterConfig(hidden_size=576, rank=512))
    assert adapter.A.shape == (512, 576)
    assert adapter.B_rct.shape == (576, 512)
    assert adapter.B_pd.shape == (576, 512)
    # LoRA-style init: B zero, A non-zero and bounded by the Kaiming-uniform limit 1/sqrt(d).
    assert not adapter.B_rct.any() and not adapter.B_pd.any()
    assert adapter.A.abs().max() <= 1 / 576**0.5 + 1e-7
    assert adapter.A.std() > 0
    assert adapter.config.scaling == pytest.approx(1 / 512)


def test_faithful_forward_is_scaled_bottleneck() -> None:
    cfg = AdapterConfig(hidden_size=16, rank=4, alpha=2.0, dropout=0.0)
    adapter = PemaAdapter(cfg).eval()
    with torch.no_grad():
        adapter.B_pd.normal_()
    x = torch.randn(5, 16)
    expected = (cfg.alpha / cfg.rank) * (x @ adapter.A.T) @ adapter.B_pd.T
    torch.testing.assert_close(adapter(x), expected)


def test_config_validation() -> None:
    with pytest.raises(AdapterError):
        AdapterConfig(hidden_size=0)
    with pytest.raises(AdapterError):
        AdapterConfig(hidden_size=8, variant="nope")
    with pytest.raises(AdapterError):
        AdapterConfig(hidden_size=8, lambda_max=1.5)
    with pytest.raises(AdapterError):
        AdapterConfig(hidden_size=8, dropout=1.0)


def _trained_looking_adapter(revision: str = "rev-a") -> PemaAdapter:
    cfg = AdapterConfig(hidden_size=32, rank=8, variant="residual", model_revision=revision)
    adapter = PemaAdapter(cfg)
    with torch.no_grad():
        adapter.B_pd.normal_()
        adapter.B_rct.normal_()
    return adapter.eval()


def test_save_load_round_trip(tmp_path: Path) -> None:
    adapter = _trained_looking_adapter()
    out = save_adapter(adapter, tmp_path / "ad", extra={"training": {"steps": 3}})
    assert (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    loaded, doc = load_adapter(out, model_revision="rev-a")
    assert loaded.config == adapter.config
    assert doc["training"] == {"steps": 3}
    assert not loaded.training
    for name, p in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p)
    keys = torch.randn(7, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(keys), adapter(keys), rtol=0, atol=0)
    # Without a revision to check against, any revision loads.
    load_adapter(out)


def test_format_metadata_peft_shaped_config_and_modes(tmp_path: Path) -> None:
    from safetensors import safe_open

    out = save_adapter(_trained_looking_adapter("rev-a"), tmp_path / "ad")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["pema_format_version"] == "2" and meta["model_revision"] == "rev-a"
    doc = json.loads((out / CONFIG_FILE).read_text())
    assert doc["format_version"] == 2 and doc["peft_type"] == "PEMA"
    assert (doc["r"], doc["lora_alpha"], doc["revision"]) == (8, 1.0, "rev-a")
    # One mode for the folder and one for its files, whichever library wrote them: private.
    assert out.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o600}


def test_loads_format_1_and_refuses_newer_formats(tmp_path: Path) -> None:
    """Adapters written before the format version (adapter.json + adapter.safetensors) load."""
    from safetensors.torch import save_file

    adapter = _trained_looking_adapter("rev-a")
    old = tmp_path / "old"
    old.mkdir()
    save_file(
        {k: v.contiguous() for k, v in adapter.state_dict().items()},
        str(old / "adapter.safetensors"),
    )
    config = dict(vars(adapter.config))
    (old / "adapter.json").write_text(json.dumps({"config": config, "training": {"steps": 1}}))
    loaded, doc = load_adapter(old, model_revision="rev-a")
    assert loaded.config == adapter.config and doc["training"] == {"steps": 1}
    assert torch.equal(loaded.B_pd, adapter.B_pd)
    new = save_adapter(adapter, tmp_path / "new")
    doc = json.loads((new / CONFIG_FILE).read_text())
    doc["format_version"] = 99
    (new / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(AdapterError, match="format 99 is newer"):
        load_adapter(new)


def test_load_refuses_other_model_revision(tmp_path: Path) -> None:
    out = save_adapter(_trained_looking_adapter("rev-a"), tmp_path / "ad")
    with pytest.raises(AdapterError, match="revision"):
        load_adapter(out, model_revision="rev-b")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(AdapterError):
        load_adapter(tmp_path / "missing")
    out = save_adapter(_trained_looking_adapter(), tmp_path / "ad")
    (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError):
        load_adapter(out)
    # Config and weights that disagree in shape.
    out2 = save_adapter(_trained_looking_adapter(), tmp_path / "ad2")
    doc = json.loads((out2 / CONFIG_FILE).read_text())
    doc["pema"]["rank"] = 4
    (out2 / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(AdapterError):
        load_adapter(out2)
    # Truncated weights.
    out3 = save_adapter(_trained_looking_adapter(), tmp_path / "ad3")
    data = (out3 / WEIGHTS_FILE).read_bytes()
    (out3 / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError):
        load_adapter(out3)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_save_replaces_existing_folder_whole(tmp_path: Path) -> None:
    out = tmp_path / "ad"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    (out / WEIGHTS_FILE).write_bytes(b"garbage")
    adapter = _trained_looking_adapter()
    save_adapter(adapter, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded, _ = load_adapter(out)
    assert torch.equal(loaded.B_pd, adapter.B_pd)
    assert _leftovers(tmp_path, "ad") == []


class _DiskFailure(OSError):
    pass


def _failing_save_file(*_args: object, **_kwargs: object) -> None:
    raise _DiskFailure("simulated disk failure while writing the weights")


def test_failed_save_leaves_no_half_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pema.adapter, "save_file", _failing_save_file)
    with pytest.raises(_DiskFailure):
        save_adapter(_trained_looking_adapter(), tmp_path / "ad")
    assert not (tmp_path / "ad").exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _trained_looking_adapter()
    out = save_adapter(old, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(pema.adapter, "save_file", _failing_save_file)
    with pytest.raises(_DiskFailure):
        save_adapter(_trained_looking_adapter("rev-b"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path, "ad") == []


def test_unsaveable_tensor_leaves_no_half_folder(tmp_path: Path) -> None:
    """A real failure inside safetensors (a tensor sharing memory with another one)."""
    adapter = _trained_looking_adapter()
    adapter.B_rct = adapter.B_pd  # two names, one storage: safetensors refuses to save it
    with pytest.raises(RuntimeError):
        save_adapter(adapter, tmp_path / "ad")
    assert list(tmp_path.iterdir()) == []
