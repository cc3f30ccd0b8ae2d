"""Calibration and evaluation text, tokenised into windows.

Sources: ``pydoc`` (the default, offline: ``pydoc_data.topics``, ~465 KB of English documentation that
ships with Python, split into a calibration half and a disjoint evaluation half), a local ``.txt`` file
or a folder of them (through ``datasets``' text builder), or a hub dataset name (``wikitext2``, ``c4``
as in SparseGPT) when the hub is reachable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import StructPruneError


class DataError(StructPruneError, ValueError):
    """Text could not be found, or there is too little of it for the request."""


Split = Literal["calibration", "evaluation"]


@dataclass(frozen=True)
class WindowSpec:
    samples: int = 128
    seqlen: int = 512
    seed: int = 0


def _pydoc_text(split: Split) -> str:
    """Topics sorted by name, first half for calibration, second for evaluation; topics repeat some
    paragraphs, so the evaluation half drops every paragraph the calibration half also has."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    calibration = "\n\n".join(topics[k].strip() for k in keys[:half])
    if split == "calibration":
        return calibration
    seen = {p.strip() for p in calibration.split("\n\n")}
    paragraphs = (p for k in keys[half:] for p in topics[k].strip().split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p.strip() not in seen)


def _hub_text(name: str, split: Split) -> str:
    import datasets

    sources = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calibration": "train", "evaluation": "test"}),
               "c4": ("allenai/c4", "en", {"calibration": "train", "evaluation": "validation"})}
    path, config, splits = sources[name]
    try:
        ds = datasets.load_dataset(path, config, split=splits[split])
    except Exception as err:  # noqa: BLE001 - re-raised with what to do
        raise DataError(f"could not load dataset {name!r} from the hub ({type(err).__name__}: {err}); offline, "
                        f"use a local .txt file or folder, or the default 'pydoc'") from err
    return "\n\n".join(t for t in ds["text"][:20000] if t.strip())


def load_text(spec: str | Path | None, split: Split) -> str:
    """The text of a source for one split. A file or folder is used whole for whichever split asks."""
    if spec is None or str(spec) == "pydoc":
        return _pydoc_text(split)
    if str(spec) in ("wikitext2", "c4"):
        return _hub_text(str(spec), split)
    path = Path(spec).expanduser()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise DataError(f"no text at {str(spec)!r}: expected a .txt file, a folder of .txt files, 'pydoc', "
                        f"'wikitext2' or 'c4'")
    import datasets

    ds = datasets.load_dataset("text", data_files=[str(f) for f in files], split="train", sample_by="document")
    return "\n\n".join(ds["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenised at once, without special tokens (no BOS), as in SparseGPT."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]  # (tokens,)


def calibration_windows(tokens: torch.Tensor, spec: WindowSpec) -> torch.Tensor:
    """``spec.samples`` disjoint windows of ``spec.seqlen`` tokens at random positions (seeded)."""
    available = tokens.numel() // spec.seqlen
    if available < spec.samples:
        raise DataError(f"calibration needs {spec.samples} windows of {spec.seqlen} tokens "
                        f"({spec.samples * spec.seqlen:,} tokens) but the text has {tokens.numel():,} tokens "
                        f"({available} windows); use fewer samples, shorter windows or more text")
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randperm(available, generator=gen)[: spec.samples].sort().values * spec.seqlen
    return torch.stack([tokens[s: s + spec.seqlen] for s in starts.tolist()])  # (samples, seqlen)


def calibration_batches(tokenizer, source: str | Path | None, samples: int, seqlen: int = 512,
                        seed: int = 0) -> list[dict]:
    """``samples`` windows of ``source``'s calibration half, one batch each (``{"input_ids": (1, seqlen)}``)."""
    windows = calibration_windows(tokenize(tokenizer, load_text(source, "calibration")), WindowSpec(samples, seqlen, seed))
    return [{"input_ids": windows[i: i + 1]} for i in range(len(windows))]


def evaluation_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the text (SparseGPT's convention)."""
    count = tokens.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(f"evaluation needs at least one window of {seqlen} tokens; the text has {tokens.numel():,}")
    return tokens[: count * seqlen].view(count, seqlen)  # (windows, seqlen)


def self_generated(model, tokenizer, spec: WindowSpec, top_p: float = 0.95, batch_size: int = 16,
                   progress: bool = True) -> torch.Tensor:
    """``spec.samples`` windows of ``spec.seqlen`` tokens sampled from the model itself (nucleus sampling,
    ``top_p``, from the BOS token; seeded): calibration text that follows what the model was trained on and
    needs no data ("self-calibration"). Returns (samples, seqlen) token ids; the BOS is not included.
    ``batch_size`` sequences are sampled together (the samples depend on it, through the random stream):
    16, as the development runs that chose the defaults sampled them (examples/generalization.py), and one
    generation loop where 8 took two (SmolLM2 on 2 CPU cores: 16 x 512 tokens in 101 s, against about 150 s
    in two loops of 8: a step's cost is mostly fixed)."""
    from tqdm import tqdm

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataError("self-generated calibration needs a BOS or EOS token to start from; give --calib text")
    device = next(model.parameters()).device
    rows = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(spec.seed)
        for first in tqdm(range(0, spec.samples, batch_size), desc="self-generated calibration", disable=not progress):
            n = min(batch_size, spec.samples - first)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)  # (n, 1)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=top_p,
                                 top_k=0, temperature=1.0, max_new_tokens=spec.seqlen, min_new_tokens=spec.seqlen,
                                 pad_token_id=tokenizer.eos_token_id)
            rows.append(out[:, 1: 1 + spec.seqlen].cpu())  # (n, seqlen)
    return torch.cat(rows)  # (samples, seqlen)


def mixed_windows(sources: "list[torch.Tensor]", samples: int, seed: int = 0) -> torch.Tensor:
    """A uniform mix: the same number of windows from each source (the first sources get one more when
    ``samples`` does not divide), in a seeded random order. Each source: (windows, seqlen)."""
    per, extra = divmod(samples, len(sources))
    counts = [per + (i < extra) for i in range(len(sources))]
    for i, (src, want) in enumerate(zip(sources, counts)):
        if len(src) < want:
            raise DataError(f"calibration source {i} has {len(src)} windows; the mix needs {want}")
    mixed = torch.cat([src[:n] for src, n in zip(sources, counts)])
    order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))
    return mixed[order]
