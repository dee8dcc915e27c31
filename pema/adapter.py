"""The PEMA adapter: a bottleneck (A, B_rct, B_pd) on last-layer context representations."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pema.errors import AdapterError
from pema.settings import ADAPTER_CONFIG as CONFIG_FILE
from pema.settings import (
    ADAPTER_FORMAT_VERSION,
    KEY_NORMS,
    LEGACY_ADAPTER_FILES,
    SCHEDULES,
    VARIANTS,
)
from pema.settings import ADAPTER_WEIGHTS as WEIGHTS_FILE
from pema.source_prior import SourcePrior


@dataclass(frozen=True)
class AdapterConfig:
    """Shape, training and inference settings of one adapter, stored beside its weights.

    variant "faithful" is the paper's head, h_pd = B_pd z. variant "residual" adds the normalized
    key back, h_pd = n(f) + B_pd z: with B_pd = 0 it starts at the frozen model's own distribution
    and learns only the task's correction (an extension beyond the paper).
    """

    hidden_size: int
    rank: int = 512
    alpha: float = 1.0
    dropout: float = 0.2
    variant: str = "faithful"
    key_norm: str = "raw"
    kappa: float = 0.2
    lambda_max: float = 0.9
    schedule: str = "gu"
    rho: float = 1.0  # expected target/source token ratio, for the GU length L
    template: str = ""
    memory_mode: str = "teacher-forced"
    model_revision: str = ""
    # AdaMix on PEMA: M copies of A share B_pd; training routes each pass through a random copy
    # with a consistency loss, inference uses the copies' average (the only A a checkpoint holds).
    mixture: int = 1
    mixture_consistency: float = 1.0
    # The source prior (an extension beyond the paper): P_PEMA = softmax(H(h_pd) + β·m), m = 1 on
    # the tokens of this row's own source text and end of turn. β starts here and is learned;
    # 0 turns it off. The tenant holds the source, so nothing more is sent to the owner.
    source_prior: float = 0.0
    # The copy prior (pema.source_prior): + γ on the source token that continues copying from
    # where the output stands in its source; γ starts here, 0 turns it off.
    copy_prior: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.hidden_size >= 1, f"hidden_size must be positive, got {self.hidden_size}"),
            (self.rank >= 1, f"rank must be positive, got {self.rank}"),
            (self.alpha > 0, f"alpha must be positive, got {self.alpha}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}"),
            (
                self.key_norm in KEY_NORMS,
                f"key_norm must be one of {KEY_NORMS}, got {self.key_norm!r}",
            ),
            (0 <= self.kappa < 1, f"kappa must be in [0, 1), got {self.kappa}"),
            (0 <= self.lambda_max <= 1, f"lambda_max must be in [0, 1], got {self.lambda_max}"),
            (
                self.schedule in SCHEDULES,
                f"schedule must be one of {SCHEDULES}, got {self.schedule!r}",
            ),
            (self.rho > 0, f"rho must be positive, got {self.rho}"),
            (self.mixture >= 1, f"mixture must be at least 1, got {self.mixture}"),
            (self.source_prior >= 0, f"source_prior must not be negative, got {self.source_prior}"),
            (self.copy_prior >= 0, f"copy_prior must not be negative, got {self.copy_prior}"),
            (
                self.mixture_consistency >= 0,
                f"mixture_consistency must not be negative, got {self.mixture_consistency}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise AdapterError(message)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def replace(self, **changes: Any) -> AdapterConfig:
        return AdapterConfig(**{**asdict(self), **changes})


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / rms(x): the final RMSNorm without its learned weight; tames outlier features."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class PemaAdapter(nn.Module):
    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        d, r = config.hidden_size, config.rank
        self.A = nn.Parameter(torch.empty(r, d))
        self.B_rct = nn.Parameter(torch.zeros(d, r))
        self.B_pd = nn.Parameter(torch.zeros(d, r))
        self.dropout = nn.Dropout(config.dropout)
        # The AdaMix copies of A (M x r x d), trained in place of A when mixture > 1.
        self.A_mix = nn.Parameter(torch.empty(config.mixture, r, d)) if config.mixture > 1 else None
        self.source_beta = (
            nn.Parameter(torch.tensor(float(config.source_prior)))
            if config.source_prior > 0
            else None
        )
        self.copy_beta = (
            nn.Parameter(torch.tensor(float(config.copy_prior))) if config.copy_prior > 0 else None
        )
        self.reset_A()

    def reset_A(self) -> None:
        """Kaiming-uniform, as LoRA and nn.Linear initialize their down-projection; AdaMix
        copies all start from that same A."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.spread_A()

    def spread_A(self) -> None:
        """Set every mixture copy to A (identical init, or continuing from an averaged A)."""
        if self.A_mix is not None:
            with torch.no_grad():
                self.A_mix.copy_(self.A.detach().expand_as(self.A_mix))

    def trainable_A(self) -> nn.Parameter:
        """The parameter that trains in A's place: the copies under AdaMix, else A."""
        return self.A if self.A_mix is None else self.A_mix

    def collapse_mixture(self) -> None:
        """A := the copies' average, what inference uses and what a checkpoint stores."""
        if self.A_mix is not None:
            with torch.no_grad():
                self.A.copy_(self.A_mix.mean(0))

    def prepare(self, keys: Tensor) -> Tensor:
        """Keys as the adapter sees them: fp32, normalized if configured (always for residual)."""
        x = keys.float()
        if self.config.key_norm == "rms" or self.config.variant == "residual":
            x = rms_normalize(x)
        return x

    def bottleneck(self, x: Tensor) -> Tensor:
        A: Tensor = self.A
        if self.A_mix is not None:
            # One random copy per pass in training (for the whole batch); the average otherwise.
            if self.training:
                A = self.A_mix[int(torch.randint(self.A_mix.shape[0], ()))]
            else:
                A = self.A_mix.mean(0)
        return self.config.scaling * (self.dropout(x) @ A.T)

    def reconstruct(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """h_rct = B_rct z; the phase-1 objective is MSE(h_rct, x) on prepared keys x."""
        return (self.bottleneck(x) if z is None else z) @ self.B_rct.T

    def predict_hidden(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """h_pd, the hidden state the LM head turns into P_PEMA."""
        h = (self.bottleneck(x) if z is None else z) @ self.B_pd.T
        return x + h if self.config.variant == "residual" else h

    def forward(self, keys: Tensor) -> Tensor:
        return self.predict_hidden(self.prepare(keys))

    @property
    def has_prior(self) -> bool:
        return self.source_beta is not None or self.copy_beta is not None

    def prior_logits(self, prior: SourcePrior | None) -> Tensor | float:
        """What the source priors add to P_PEMA's logits (B x V; 0 with no prior on)."""
        if not self.has_prior:
            return 0.0
        if prior is None:
            raise AdapterError("this adapter has a source prior: each row's source is needed")
        out: Tensor | float = 0.0
        if self.source_beta is not None:
            out = self.source_beta * prior.mask
        if self.copy_beta is not None:
            out = out + self.copy_beta * prior.copy_mask()
        return out

    def logits(self, head: nn.Module, h_pd: Tensor, prior: SourcePrior | None) -> Tensor:
        """P_PEMA's logits from h_pd; `prior` is needed with a source prior on."""
        out: Tensor = head(h_pd)
        return out + self.prior_logits(prior)

    def inference_state(self) -> dict[str, Tensor]:
        """The weights needed to generate (B_rct only serves training)."""
        A = self.A if self.A_mix is None else self.A_mix.mean(0)
        state = {"A": A.detach(), "B_pd": self.B_pd.detach()}
        for name in ("source_beta", "copy_beta"):
            beta = getattr(self, name)
            if beta is not None:
                state[name] = beta.detach()
        return state


def count_parameters(adapter: PemaAdapter) -> dict[str, int]:
    return {name: p.numel() for name, p in adapter.named_parameters()}


# Folder and files of a saved adapter: private to the tenant (its weights never leave its
# machine), and the same mode whichever library wrote the file.
DIR_MODE, FILE_MODE = 0o700, 0o600


def adapter_document(config: AdapterConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """adapter_config.json: peft's field names where they mean the same (r, lora_alpha,
    lora_dropout, revision, task_type), the whole PEMA config under "pema", then `extra`."""
    own = {
        "format_version": ADAPTER_FORMAT_VERSION,
        "peft_type": "PEMA",
        "task_type": "CAUSAL_LM",
        "revision": config.model_revision,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "inference_mode": True,
        "pema": asdict(config),
    }
    return {**own, **{k: v for k, v in (extra or {}).items() if k not in own}}


def save_adapter(
    adapter: PemaAdapter, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write weights (safetensors, with the format version and model revision in its metadata)
    + adapter_config.json to out_dir atomically: all or nothing. Replaces an existing adapter
    (callers that must not overwrite check first)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        adapter.collapse_mixture()
        # Mixture copies are training state: the checkpoint keeps their average in A only.
        tensors = {
            k: v.detach().contiguous() for k, v in adapter.state_dict().items() if k != "A_mix"
        }
        metadata = {
            "format": "pt",
            "pema_format_version": str(ADAPTER_FORMAT_VERSION),
            "model_revision": adapter.config.model_revision,
        }
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        doc = adapter_document(adapter.config, extra)
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        for f in tmp.iterdir():
            f.chmod(FILE_MODE)
        tmp.chmod(DIR_MODE)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def adapter_files(path: Path) -> tuple[Path, Path, int] | None:
    """(config, weights, format version) of the adapter in `path`, or None if it holds none.
    Version 1 is the earlier layout (adapter.json + adapter.safetensors), still readable."""
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return path / CONFIG_FILE, path / WEIGHTS_FILE, ADAPTER_FORMAT_VERSION
    legacy_cfg, legacy_weights = (path / name for name in LEGACY_ADAPTER_FILES)
    if legacy_cfg.is_file() and legacy_weights.is_file():
        return legacy_cfg, legacy_weights, 1
    return None


def read_adapter_document(path: Path) -> tuple[dict[str, Any], AdapterConfig, Path]:
    """The config document, the AdapterConfig and the weights file of an adapter folder, read
    without loading weights (for `pema-tenant adapters`)."""
    found = adapter_files(path)
    if found is None:
        raise AdapterError(
            f"{path}: not an adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    cfg_file, weights_file, version = found
    try:
        doc = json.loads(cfg_file.read_text())
        stored = doc.get("format_version", 1)
        if stored > ADAPTER_FORMAT_VERSION:
            raise AdapterError(
                f"{path}: adapter format {stored} is newer than this version of pema reads "
                f"({ADAPTER_FORMAT_VERSION}): upgrade pema-service"
            )
        fields_doc = doc["pema"] if version >= 2 else doc["config"]
        known = {f.name for f in fields(AdapterConfig)}
        config = AdapterConfig(**{k: v for k, v in fields_doc.items() if k in known})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise AdapterError(f"{path}: unreadable adapter ({e})") from None
    return doc, config, weights_file


def load_adapter(
    path: str | Path, model_revision: str | None = None
) -> tuple[PemaAdapter, dict[str, Any]]:
    """Load an adapter; refuses one trained on another model revision than `model_revision`."""
    path = Path(path)
    doc, config, weights_file = read_adapter_document(path)
    try:
        tensors = load_file(str(weights_file))
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{path}: unreadable adapter ({e})") from None
    if model_revision is not None and config.model_revision != model_revision:
        raise AdapterError(
            f"{path}: adapter was trained on model revision {config.model_revision}, "
            f"this model is revision {model_revision}"
        )
    adapter = PemaAdapter(config)
    try:
        if adapter.A_mix is not None and "A" in tensors:
            # The checkpoint holds the averaged A; the copies restart from it, identically.
            tensors["A_mix"] = tensors["A"].expand_as(adapter.A_mix).clone()
        adapter.load_state_dict(tensors)
    except RuntimeError as e:
        raise AdapterError(
            f"{path}: weights do not match the config ({str(e).splitlines()[0]})"
        ) from None
    adapter.eval()
    return adapter, doc
