"""Compiler passes over a traced model (installed as ``structprune_graph.passes``).

Analysis passes return plans and never touch weights; only ``rewrite`` changes a model.
"""

from ._infra import Pass, PassResult
from .rewrite import ApplyPass, MaskPass, RewriteRequest, validate_keep

__all__ = ["Pass", "PassResult", "ApplyPass", "MaskPass", "RewriteRequest", "validate_keep"]
