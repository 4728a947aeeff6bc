"""A small masked-diffusion language model (MDLM) with the SUBS parameterisation.

Forward process: each token of a clean sequence x0 is replaced by the mask token with probability
1 - alpha_t, independently. The log-linear schedule makes the mask fraction linear in t:
1 - alpha_t = (1 - eps) t, eps = 1e-3.

Denoiser: a bidirectional pre-LayerNorm transformer (token and learned position embeddings,
`layers` encoder blocks, a final LayerNorm and a linear read-out). Like the MDLM checkpoint for
OpenWebText, it does not receive t: the masked positions carry that information. SUBS: the mask token
is never predicted (its logit is -inf), and positions that are not masked carry their token over
(log-probability 0 for it, -inf for the rest).

Loss (MDLM, continuous time): E_t [ w(t) sum_{i masked} -log p(x0_i | x_t) ] / L with
w(t) = -alpha'_t / (1 - alpha_t) = 1 / t for the log-linear schedule.

Checkpoints are a dict of tensors and plain values: `format`, `config` (the architecture and the
corpus it was trained on) and `state_dict`, read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phases.data.corpus import MASK, VOCAB_SIZE

EPS = 1e-3
CHECKPOINT_FORMAT = "phases-mdm-1"


def mask_fraction(t: torch.Tensor | float) -> torch.Tensor | float:
    """1 - alpha_t of the log-linear schedule."""
    return (1.0 - EPS) * t


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and training data of a model; stored in its checkpoint."""

    length: int = 64
    vocab: int = VOCAB_SIZE
    dim: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    causal: bool = False  # True for the autoregressive reference model
    corpus: str = "code"
    python_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Transformer(nn.Module):
    """Pre-LayerNorm transformer encoder over token ids; bidirectional unless `config.causal`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.position = nn.Parameter(torch.zeros(1, config.length, config.dim))
        block = nn.TransformerEncoderLayer(
            config.dim, config.heads, config.mlp_ratio * config.dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.vocab)
        nn.init.normal_(self.position, std=0.02)
        causal = torch.triu(torch.full((config.length, config.length), float("-inf")), diagonal=1) if config.causal else None
        self.register_buffer("causal_mask", causal, persistent=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last hidden states (N, L, dim), after the final LayerNorm."""
        x = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        mask = None if self.causal_mask is None else self.causal_mask[: tokens.shape[1], : tokens.shape[1]]
        return self.norm(self.blocks(x, mask=mask, is_causal=mask is not None))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(tokens))


class MaskedDiffusionLM(nn.Module):
    """The MDLM denoiser: `log_probs(x_t)` gives log p(x0 | x_t) with the SUBS parameterisation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.causal:
            raise ValueError("a masked-diffusion denoiser is bidirectional; set causal: false")
        self.config = config
        self.net = Transformer(config)

    def log_probs(self, x_t: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x0 | x_t), (N, L, vocab): masked positions get the network's distribution without
        the mask token; other positions carry their token over."""
        h = self.net.hidden(x_t) if hidden is None else hidden
        logits = self.net.out(h)
        logits[..., MASK] = float("-inf")
        log_p = torch.log_softmax(logits, dim=-1)
        carried = torch.full_like(log_p, float("-inf")).scatter_(-1, x_t.unsqueeze(-1), 0.0)
        return torch.where((x_t == MASK).unsqueeze(-1), log_p, carried)

    def loss(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Compute the MDLM loss of a batch of clean sequences (N, L), per token, with t ~ U(eps, 1)."""
        n = x0.shape[0]
        # Low-discrepancy times (one uniform offset, N evenly spaced values) reduce the loss's variance.
        offset = torch.rand(1, generator=generator, device=x0.device)
        t = EPS + (1 - EPS) * ((offset + torch.arange(n, device=x0.device) / n) % 1.0)
        masked = torch.rand(x0.shape, generator=generator, device=x0.device) < mask_fraction(t)[:, None]
        x_t = torch.where(masked, torch.full_like(x0, MASK), x0)
        log_p = self.log_probs(x_t).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        per_sequence = (-(log_p * masked).sum(dim=1)) / t
        return per_sequence.mean() / x0.shape[1]


class AutoregressiveLM(nn.Module):
    """A causal reference model: `nll(x)` gives each sequence's negative log-likelihood per token."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.causal:
            raise ValueError("the reference model is autoregressive; set causal: true")
        self.config = config
        self.net = Transformer(config)

    def nll(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Compute each sequence's mean negative log-likelihood per predicted token (N,).

        Tokens 1..L-1 are predicted from their prefixes. With `lengths`, only the first `lengths`
        predictions count, which include the first padding token, so the end of a text is scored."""
        logits = self.net(tokens[:, :-1])
        target = tokens[:, 1:]
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view(target.shape)
        if lengths is None:
            return per_token.mean(dim=1)
        keep = torch.arange(target.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        return (per_token * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.nll(tokens).mean()


def save_checkpoint(model: nn.Module, path: str | Path, kind: str, metrics: dict[str, float] | None = None) -> None:
    """Write a model and its config; `kind` is 'denoiser', 'reference' or 'head'."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT, "kind": kind, "config": asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "metrics": dict(metrics or {}),
    }
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def read_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """Read and check a checkpoint file written by `save_checkpoint` (weights only, no code runs).

    Raises ValueError, naming the file and what is wrong, for a missing, corrupt or foreign file
    and for a checkpoint of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} not found; create it with `phases mdm pretrain` (denoiser) or `phases mdm pretrain-reference`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for unreadable files
        raise ValueError(f"checkpoint {path} is not a readable torch file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                         "it may be truncated or not a checkpoint; write it again") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a phases masked-diffusion checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    if state.get("kind") != kind:
        raise ValueError(f"checkpoint {path} contains a {state.get('kind')!r} model, but a {kind!r} model is needed here")
    return state


def load_state(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights into `model`; a shape or key mismatch raises ValueError."""
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3] or [str(exc)]
        raise ValueError(f"checkpoint {path} does not match its config's architecture: {' '.join(s.strip() for s in first)[:300]}") from None


def load_checkpoint(path: str | Path, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a denoiser or reference model and its metrics; raises ValueError for unusable files."""
    state = read_checkpoint(path, kind)
    try:
        config = ModelConfig(**state["config"])
    except TypeError as exc:
        raise ValueError(f"checkpoint {path} has an unknown config ({exc}); it was written by another phases version") from None
    model: nn.Module = AutoregressiveLM(config) if config.causal else MaskedDiffusionLM(config)
    load_state(model, state, path)
    model.eval()
    return model, state.get("metrics", {})


def fingerprint(model: nn.Module) -> str:
    """Return a SHA-256 digest of a model's weights, which names the exact model a head was trained on."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
