"""Where a tenant's hidden states come from: the model in this process, or a coordinator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pema.backbone import Backbone, FrozenLM
from pema.models import DEFAULT_MODEL_NAME, load_causal_lm, model_revision, resolve_model_dir
from tenant.coordinator_client import (
    ClientConfig,
    CoordinatorBackbone,
    CoordinatorClient,
    TlsOptions,
)


@dataclass
class Backend:
    backbone: Backbone
    tokenizer: PreTrainedTokenizerBase


def local_backend(
    model: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Backend:
    """Load the frozen model in this process (the default model when `model` is None) onto
    `device` (None: $PEMA_DEVICE, else CUDA when present, else CPU), in the device's forward
    dtype unless `dtype` says otherwise."""
    model_dir = resolve_model_dir(model)
    lm, tokenizer = load_causal_lm(model_dir, dtype, device)
    name = DEFAULT_MODEL_NAME if model is None else model_dir.name
    return Backend(FrozenLM(lm, name, model_revision(model_dir)), tokenizer)


def coordinator_backend(
    address: str,
    token: str,
    tls: TlsOptions | None = None,
    **client_options: Any,
) -> Backend:
    """The frozen model behind a coordinator: head and tokenizer downloaded once, then cached."""
    client = CoordinatorClient(ClientConfig(address, token, tls, **client_options))
    backbone = CoordinatorBackbone(client)
    return Backend(backbone, backbone.tokenizer())
