"""Registry of trial kinds: what a point trains. Look kinds up by name with `get_kind`."""

from __future__ import annotations

from phases.trials.base import ChunkResult, TrialContext, TrialKind
from phases.trials.isotropic import IsotropicKind
from phases.trials.network import NetworkKind
from phases.trials.remask import RemaskKind

_KINDS: dict[str, TrialKind] = {kind.name: kind for kind in (IsotropicKind(), NetworkKind(), RemaskKind())}

__all__ = ["ChunkResult", "TrialContext", "TrialKind", "get_kind", "kind_names"]


def get_kind(name: str) -> TrialKind:
    """Return the registered kind; raises KeyError naming the known kinds."""
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown trial kind {name!r}; known kinds: {', '.join(_KINDS)}") from None


def kind_names() -> list[str]:
    return list(_KINDS)
