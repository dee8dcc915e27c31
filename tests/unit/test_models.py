"""Resolving `--model`: a folder, a registered model's name, or the default; nothing converted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from coordinator.cli import build_parser as coordinator_parser
from coordinator.config import ConfigError, CoordinatorConfig, parse_tenants
from pema.errors import ModelError
from pema.models import (
    DEFAULT_MODEL,
    GEMMA_3_270M,
    MODELS,
    named_model_dir,
    resolve_model_dir,
)
from pema.peers.cli import build_parser as peers_parser
from tenant.cli import build_parser as tenant_parser


def _fake_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_registry_holds_the_default_and_gemma_under_their_names() -> None:
    assert {DEFAULT_MODEL.name: DEFAULT_MODEL, "gemma-3-270m": GEMMA_3_270M} == MODELS
    assert "Gemma" in GEMMA_3_270M.license


def test_a_name_resolves_to_its_converted_folder_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEMA_CACHE_DIR", str(tmp_path / "cache"))
    converted = _fake_folder(tmp_path / "cache" / "models" / "gemma-3-270m")
    assert resolve_model_dir("gemma-3-270m") == converted
    assert resolve_model_dir(Path("gemma-3-270m")) == converted  # as the CLIs' type=Path passes it
    # A folder of that name wins over the registered name.
    monkeypatch.chdir(tmp_path)
    local = _fake_folder(tmp_path / "gemma-3-270m")
    assert resolve_model_dir("gemma-3-270m").resolve() == local


def test_unknown_model_is_refused_with_the_names(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="gemma-3-270m") as e:
        resolve_model_dir(tmp_path / "nothing-here")
    assert "nothing-here" in str(e.value)


def test_coordinator_config_takes_a_model_name_or_a_folder(tmp_path: Path) -> None:
    tenants = tuple(parse_tenants({"tenants": [{"id": "a", "token_sha256": "1" * 64}]}, "f"))
    assert CoordinatorConfig(tenants, model=Path("gemma-3-270m")).model == Path("gemma-3-270m")
    with pytest.raises(ConfigError, match="nor a model name"):
        CoordinatorConfig(tenants, model=tmp_path / "gemma-3-270m")


def test_missing_package_names_the_install_command(tmp_path: Path) -> None:
    absent = dataclasses.replace(GEMMA_3_270M, package="pema_test_no_such_package")
    with pytest.raises(ModelError, match="make gemma"):
        named_model_dir(absent, tmp_path)
    assert not (tmp_path / "models" / "gemma-3-270m").exists()


@pytest.mark.parametrize(
    "parser, argv",
    [
        (tenant_parser, ["train"]),
        (coordinator_parser, ["serve"]),
        (peers_parser, ["train-eval"]),
    ],
    ids=["tenant", "coordinator", "peers"],
)
def test_model_help_names_every_registered_model(parser, argv: list[str]) -> None:
    sub = parser()._subparsers._group_actions[0].choices[argv[0]]  # type: ignore[union-attr]
    (action,) = [a for a in sub._actions if "--model" in a.option_strings]
    for name in MODELS:
        assert name in action.help
    assert "default: " in action.help
