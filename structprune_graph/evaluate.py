"""Quality and cost measurements: perplexity (SparseGPT convention), parameters, FLOPs per token,
peak memory."""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> list[float]:
    """The mean next-token loss of each non-overlapping window (its first token has no prediction: ``seqlen -
    1`` losses per window), one float per window."""
    device = next(model.parameters()).device
    out: list[float] = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = windows[start: start + batch_size].to(device)  # (batch, seqlen)
        logits = model(input_ids=ids).logits.float()  # (batch, seqlen, vocab)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="none")
        out.extend(loss.view(ids.shape[0], -1).mean(dim=1).tolist())  # (batch,)
    return out


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """exp of the mean next-token loss over non-overlapping windows, all windows weighted equally, as
    SparseGPT does (``window_losses``)."""
    losses = window_losses(model, windows, batch_size, progress)
    return math.exp(sum(losses) / len(losses))


def paired_ratio(losses: Sequence[float], reference: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """ppl / reference ppl on the same windows, and its interval exp(mean d +- z se(d)), d the per-window loss
    differences: (ratio, low, high). Pairing removes the windows' own difficulty, which both models share."""
    if len(losses) != len(reference) or len(losses) < 2:
        raise ValueError(f"paired_ratio needs the same windows, at least 2: got {len(losses)} and {len(reference)}")
    d = [a - b for a, b in zip(losses, reference)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return math.exp(mean), math.exp(mean - z * se), math.exp(mean + z * se)


def main_output(output) -> torch.Tensor:
    """The tensor a model's output stands for: ``logits``, else ``last_hidden_state``, else (contrastive
    two-tower models such as CLIP) ``logits_per_image``, which reads both towers, else the tensor."""
    for attr in ("logits", "last_hidden_state", "logits_per_image"):
        if getattr(output, attr, None) is not None:  # a ModelOutput lists its unset fields as None
            return getattr(output, attr)
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError(f"{type(output).__name__} has no logits, last_hidden_state or logits_per_image and is not a "
                    f"tensor")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def flops_per_token(model: nn.Module, seqlen: int = 128) -> float:
    """FLOPs of one forward pass per token at ``seqlen`` (matmuls and attention counted by torch's
    FlopCounterMode on a real forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    ids = torch.zeros(1, seqlen, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids)
    return counter.get_total_flops() / seqlen


# one log record per finished stage of a pruning (solver stages, writing, evaluation): the benchmarks that
# attribute peak memory to stages read these records' times (examples/scale_7b.py)
STAGE_LOG = "stage %s done in %.2f s"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class PeakMemory:
    rss_bytes: int = 0
    cuda_bytes: Optional[int] = None
    seconds: float = 0.0


@contextmanager
def track_peak_memory(interval_s: float = 0.02) -> Iterator[PeakMemory]:
    """Peak resident memory (sampled) and peak CUDA allocation over the block, with its wall time."""
    peak = PeakMemory(rss_bytes=_rss_bytes())
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            peak.rss_bytes = max(peak.rss_bytes, _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak.rss_bytes = max(peak.rss_bytes, _rss_bytes())
        peak.seconds = time.perf_counter() - start
        if torch.cuda.is_available():
            peak.cuda_bytes = torch.cuda.max_memory_allocated()


def cache_argument(model: nn.Module) -> str:
    """The keyword a transformers model takes its KV cache by (5.2x renamed past_key_values -> cache)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def present_cache(output) -> object:
    """The KV cache a transformers forward returned."""
    return getattr(output, "cache", None) or output.past_key_values


def greedy_tokens(model: nn.Module, prompt: Sequence[int], steps: int) -> list[int]:
    """``steps`` greedy tokens after ``prompt`` (batch 1) with transformers' KV cache and no end-of-sequence
    stop: the reference exported decoders (ONNX with a cache, GGUF in llama.cpp) are checked against."""
    ids = torch.tensor([list(prompt)])
    out: list[int] = []
    past = None
    name = cache_argument(model)
    with torch.no_grad():
        for _ in range(steps):
            output = model(ids if past is None else ids[:, -1:], use_cache=True, **{name: past})
            past = present_cache(output)
            token = int(output.logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out
