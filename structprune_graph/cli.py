"""The ``structprune`` command line. Argument parsing lives here and nowhere else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from math import prod
from typing import Optional, Sequence

from .errors import StructPruneError


def _inspect(args: argparse.Namespace) -> int:
    from .graph import trace
    from .models import example_inputs_for, load_model

    t0 = time.perf_counter()
    model = load_model(args.model)
    t1 = time.perf_counter()
    graph = trace(model, example_inputs_for(model), frontend=args.frontend)
    t2 = time.perf_counter()
    if args.json:
        print(json.dumps([{"id": g.id, "kind": g.kind, "size": g.size, "params_per_unit": g.params_per_unit,
                           "heads_per_unit": g.heads_per_unit, "prunable": g.prunable, "reason": g.reason,
                           "mask_exact": g.mask_exact, "members": [m.label for m in g.members]}
                          for g in graph.groups], indent=1))
        return 0
    width = max(len(g.id) for g in graph.groups) if graph.groups else 10
    print(f"{'group':<{width}}  {'kind':<14} {'units':>6} {'params/unit':>11} {'exact':>5}  prunable")
    for g in graph.groups:
        units = f"{g.size}" if g.kind != "kv_group" else f"{g.size}x{g.heads_per_unit}q"
        status = "yes" if g.prunable else f"no: {g.reason}"
        print(f"{g.id:<{width}}  {g.kind:<14} {units:>6} {g.params_per_unit:>11,} {'yes' if g.mask_exact else 'no':>5}  {status}")
    total = sum(prod(s) for s in graph.param_shapes.values())
    prunable = graph.prunable_param_count()
    kinds = Counter(g.kind for g in graph.prunable_groups)
    print(f"\n{type(model).__name__}: {total:,} parameters, {len(graph.fx_graph.nodes):,} graph nodes "
          f"({graph.captured.frontend}), {len(graph.groups)} groups, {len(graph.prunable_groups)} prunable "
          f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    print(f"parameters in prunable head/channel groups (excluding the hidden dim): {prunable:,} "
          f"({prunable / total:.1%})")
    if graph.unsupported:
        print(f"ops without a coupling rule (their groups are unprunable): {', '.join(graph.unsupported)}")
    print(f"load {t1 - t0:.1f} s, trace {t2 - t1:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structprune", description="Structured pruning through a traced "
                                     "dependency graph of coupled channel and head groups.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="trace a model and print its coupled groups")
    inspect.add_argument("model", nargs="?", default=None,
                         help="transformers folder, .gguf file, or 'smollm2' (default: the embedded SmolLM2-135M)")
    inspect.add_argument("--frontend", choices=("auto", "export", "fx"), default="auto")
    inspect.add_argument("--json", action="store_true", help="print the groups as JSON")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except StructPruneError as err:
        print(f"structprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
