"""Saving a pruned model to a folder and loading it back.

When every layer kept the same widths (``uniform=True``) and the architecture names its layers as the
LLaMA family does, ``config.json`` has the pruned sizes: stock ``from_pretrained`` loads the folder without
this library (checked at save time: the folder is loaded so and its logits compared). Otherwise stock
transformers cannot express per-layer head counts or widths, so a folder holds the original config, the
plan (keep-sets) and the pruned weights; ``load`` rebuilds the architecture from the config, re-applies
the plan's structure (trace + rewrite) and loads the weights. Folders are written to a
temporary sibling and renamed at the end: an interrupted run leaves nothing half-written, and an
existing folder is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .errors import StructPruneError

FORMAT = 1
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"  # written by the streaming pruner: one shard per block


class OutputExistsError(StructPruneError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


def check_output_dir(directory: Path, overwrite: bool, inputs: Sequence[Union[str, Path]] = ()) -> None:
    """Refuse, before any work, an output folder that exists (without ``overwrite``), that is, contains or
    lies inside one of the ``inputs`` (replacing it would delete what the run reads), or whose parent
    cannot be written."""
    out = Path(directory).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if out == src or out in src.parents or src in out.parents:
            relation = "is" if out == src else "contains" if out in src.parents else "lies inside"
            raise StructPruneError(f"output folder {directory} {relation} the input {source}; writing it could "
                                   f"destroy the model the run reads: choose an --out outside the input")
    if directory.exists() and not overwrite:
        raise OutputExistsError(f"output folder {directory} exists; pass --overwrite (overwrite=True) to replace "
                                f"it, or choose another folder")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StructPruneError(f"cannot write the output folder {directory}: {parent} is not a writable folder; "
                               f"choose another --out")


def _input_spec(example_inputs: Any) -> dict:
    if isinstance(example_inputs, dict):
        return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                for k, v in example_inputs.items() if isinstance(v, torch.Tensor)}
    raise StructPruneError("saving needs keyword example inputs (a dict) so that load() can trace the model again")


@contextmanager
def atomic_folder(directory: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder to write into; renamed to ``directory`` when the block ends without an
    error (replacing it only with ``overwrite``), removed otherwise."""
    check_output_dir(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        yield tmp
        if directory.exists():
            backup = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            os.replace(directory, backup / "old")
            os.replace(tmp, directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_meta(folder: Path, architecture: str, example_inputs: Any, why_not_stock: str, source: str = "") -> None:
    """``why_not_stock``: "" when ``config.json`` has the pruned sizes (stock ``from_pretrained`` loads it),
    else why it is the dense config plus the plan. ``source``: the model file pruned, when known (a GGUF
    export copies its tokenizer from a ``.gguf`` source)."""
    meta = {"format": FORMAT, "architecture": architecture, "example_inputs": _input_spec(example_inputs),
            "config": "dense+plan" if why_not_stock else "stock", "why_not_stock": why_not_stock}
    if source:
        meta["source"] = source
    (folder / "structprune.json").write_text(json.dumps(meta, indent=1))


def loads_with(directory: Union[str, Path]) -> str:
    """Which loaders read a written folder, and why only ours when that is so."""
    meta = _read_meta(Path(directory))
    exports = ("; exported: llama.cpp (structprune export DIR --gguf, per-layer arrays for LLaMA-layout models) "
               "and onnxruntime (--onnx, or --onnx-decoder with a KV cache)")
    if meta.get("config") == "stock":
        return ("stock transformers from_pretrained (config.json has the pruned sizes) and structprune_graph.load"
                + exports)
    return (f"structprune_graph.load only among transformers loaders (config.json is the dense config plus "
            f"plan.json: {meta.get('why_not_stock', 'not uniform')})" + exports)


def save_pruned(result: Any, directory: Path, overwrite: bool, tokenizer: Any, stock: bool = True,
                source: str = "") -> Path:
    from safetensors.torch import save_model

    from .hf_config import stock_config
    from .report import write_report

    check_output_dir(directory, overwrite)
    model = result.model
    config = getattr(model, "config", None)
    if config is None:
        raise StructPruneError("save() rebuilds models from a transformers config; for other models save "
                               "result.plan and result.model.state_dict() yourself and use apply_plan()")
    _input_spec(result.example_inputs)  # fails before anything is written
    pruned_config, why = stock_config(model, config) if stock else (None, "stock=False")
    with atomic_folder(directory, overwrite) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        (pruned_config or config).save_pretrained(tmp)
        result.plan.save(tmp / "plan.json")
        write_meta(tmp, type(model).__name__, result.example_inputs, why, source)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        write_report(tmp, result.report.with_metrics(loads_with=loads_with(tmp)))
        if pruned_config is not None:
            _check_stock(tmp, model, result.example_inputs)
    return directory


def _check_stock(folder: Path, model: nn.Module, inputs: Any) -> None:
    """Load the folder as a user without this library would, and compare its logits with the pruned model."""
    import transformers

    from .errors import RewriteError
    from .verify import verify_forward

    where = "save: the folder loaded with stock from_pretrained"
    advice = "pass stock=False to save the dense config and the plan instead, and report the architecture"
    try:
        stock = getattr(transformers, type(model).__name__).from_pretrained(str(folder),
                                                                           dtype=next(model.parameters()).dtype)
    except Exception as err:  # the config we wrote does not describe the weights: never write that folder
        raise RewriteError(f"{where} fails: {type(err).__name__}: {str(err)[:300]}; {advice}") from err
    verify_forward(stock.eval(), inputs, reference=model, where=f"{where} ({advice})")


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load ``model.safetensors`` or the shards of ``model.safetensors.index.json`` into ``model``; any
    missing or extra tensor is an error (tied weights are stored once)."""
    from safetensors.torch import load_file, load_model

    index = directory / SHARD_INDEX
    if not index.is_file():
        load_model(model, str(directory / WEIGHTS), strict=True)  # raises on any missing or extra tensor
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(str(directory / shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[n]) for n in state if n in params}
    missing = [n for n in missing if not (n in params and id(params[n]) in loaded)]
    if missing or unexpected:
        raise StructPruneError(f"{directory}: weights do not fit the rebuilt model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")


def _read_meta(directory: Path) -> dict:
    meta_path = directory / "structprune.json"
    if not meta_path.is_file():
        raise StructPruneError(f"{directory} is not a structprune output folder (no structprune.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise StructPruneError(f"{meta_path}: format {meta.get('format')!r} is not supported (expected {FORMAT})")
    return meta


def source_of(directory: Union[str, Path]) -> Optional[Path]:
    """The model file a folder was pruned from, when it was recorded and still exists."""
    source = _read_meta(Path(directory)).get("source")
    return Path(source) if source and Path(source).is_file() else None


def example_inputs_of(directory: Union[str, Path]) -> dict:
    """Inputs of the shapes the folder's model was traced with (token ids 0, attention mask 1)."""
    meta = _read_meta(Path(directory))
    inputs = {k: torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"])) for k, v in meta["example_inputs"].items()}
    if "attention_mask" in inputs:
        inputs["attention_mask"] += 1
    return inputs


def load(directory: Union[str, Path]) -> nn.Module:
    """Rebuild a pruned model saved by ``PruneResult.save`` / ``structprune prune``."""
    import transformers

    from .graph import trace

    directory = Path(directory)
    meta = _read_meta(directory)
    config = transformers.AutoConfig.from_pretrained(str(directory))
    model = getattr(transformers, meta["architecture"])(config).eval()
    inputs = example_inputs_of(directory)
    # a stock config has the pruned sizes already; otherwise the plan's structure is applied to the dense one
    pruned = model if meta.get("config") == "stock" else pruned_structure(directory, model, trace(model, inputs))
    load_weights(pruned, directory)
    from .verify import verify_forward

    verify_forward(pruned, inputs, where=f"load({directory})")
    return pruned.eval()


def pruned_structure(directory: Path, model: nn.Module, graph: Any) -> nn.Module:
    """A saved folder's architecture on a fresh ``model`` (traced as ``graph``): the plan's keep-sets
    applied and room made for the biases a method created (FLAP); the weights are not loaded, so the
    model is run by the caller once they are (``load``, ``prune_checkpoint``)."""
    from .module_attrs import output_dim
    from .passes import ApplyPass, RewriteRequest
    from .plan import Plan

    plan = Plan.load(directory / "plan.json")
    try:
        plan.check(model, graph)
    except StructPruneError as err:
        raise type(err)(f"{directory / 'plan.json'}: {err}") from None
    pruned = ApplyPass()(RewriteRequest(model, graph, plan.keep, run_check=False)).state
    for path in plan.meta.get("bias_compensated", []):
        layer = pruned.get_submodule(path)
        if getattr(layer, "bias", None) is None:
            out = layer.weight.shape[output_dim(layer)]
            layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))
    return pruned
