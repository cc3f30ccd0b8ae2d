"""Typed errors: each says what failed, where (pass, node, group) and what to do."""


class StructPruneError(Exception):
    """Base class of every error this library raises on purpose."""


class TraceError(StructPruneError):
    """The model could not be captured as an fx graph."""


class KeepSetError(StructPruneError, ValueError):
    """A keep-set names an unknown group, bad indices, or breaks a group's constraint."""


class PlanMismatchError(StructPruneError, ValueError):
    """A saved plan does not belong to the model it is applied to."""


class RewriteError(StructPruneError):
    """The physical rewrite produced a model that does not run or has the wrong shapes."""


class ModelNotFoundError(StructPruneError, FileNotFoundError):
    """A model could not be located; the message lists what was tried."""
