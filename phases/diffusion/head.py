"""The remasking head: which tokens of a complete proposal x0_hat are wrong.

The head is one LayerNorm and one linear map to a single logit per position, on the frozen
denoiser's last hidden states for x0_hat (a backbone pass over the proposal). It is trained with
binary cross-entropy on labels y_i = [x0_hat_i != x0_i]. The proposal x0_hat comes from one
denoising step of a clean sequence x0 from a random noise level: t ~ U(eps, 1), x_t masks each
token with probability m(t), and every masked position is drawn from p(x0 | x_t) while the others
are carried over. Carried-over positions therefore always have label 0, and the positive rate is
at most the mask fraction.

Metrics: BCE, AUROC and F1 (at logit 0), next to the base rate (the fraction of positives). A
predictor that flags every position has F1 = 2 p / (1 + p) at base rate p, and chance AUROC is 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phases.data.corpus import MASK
from phases.diffusion.model import (
    CHECKPOINT_FORMAT, EPS, MaskedDiffusionLM, ModelConfig, Transformer, fingerprint, load_state, mask_fraction, read_checkpoint,
)
from phases.diffusion.samplers import draw_tokens


class RemaskHead(nn.Module):
    """LayerNorm + Linear(dim -> 1): error logits (N, L) for a proposal.

    With `blocks` = 0 the head reads the frozen denoiser's last hidden states of the proposal, so a
    guided step costs one more backbone pass. With `blocks` = n > 0 it also owns a trainable copy
    of the denoiser's token and position embeddings and its first n blocks, made by
    `from_denoiser`. It then reads the proposal's tokens itself, and a guided step costs n / layers
    of a backbone pass.
    """

    def __init__(self, dim: int, blocks: int = 0, config: ModelConfig | None = None):
        super().__init__()
        if blocks and config is None:
            raise ValueError("a head with copied blocks needs the denoiser's config")
        self.dim = dim
        self.blocks = blocks
        if blocks:
            trunk = Transformer(replace(config, layers=blocks))
            self.embed, self.position, self.layers = trunk.embed, trunk.position, trunk.blocks
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def from_denoiser(cls, model: MaskedDiffusionLM, blocks: int = 0) -> "RemaskHead":
        """Build a fresh head for `model`, copying its embeddings and first `blocks` blocks."""
        if not 0 <= blocks <= model.config.layers:
            raise ValueError(f"head blocks must be between 0 and the denoiser's {model.config.layers} layers, got {blocks}")
        head = cls(model.config.dim, blocks, model.config)
        if blocks:
            head.embed.load_state_dict(model.net.embed.state_dict())
            head.position.data.copy_(model.net.position.data)
            for copy, original in zip(head.layers.layers, model.net.blocks.layers):
                copy.load_state_dict(original.state_dict())
        return head.to(next(model.parameters()).device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(hidden)).squeeze(-1)

    def features(self, model: MaskedDiffusionLM, proposal: torch.Tensor) -> torch.Tensor:
        """Return what the head reads for a proposal: the backbone's hidden states (no gradient),
        or the output of its own copied blocks."""
        if not self.blocks:
            with torch.no_grad():
                return model.net.hidden(proposal)
        return self.layers(self.embed(proposal) + self.position[:, : proposal.shape[1]])

    def scores(self, model: MaskedDiffusionLM, proposal: torch.Tensor) -> torch.Tensor:
        """Return the error logits (N, L) of a proposal."""
        return self(self.features(model, proposal))


@torch.no_grad()
def proposals(model: MaskedDiffusionLM, x0: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take one denoising step from a random noise level per sequence; return (x_t, x0_hat, labels)."""
    t = EPS + (1 - EPS) * torch.rand(x0.shape[0], generator=generator, device=x0.device)
    masked = torch.rand(x0.shape, generator=generator, device=x0.device) < mask_fraction(t)[:, None]
    x_t = torch.where(masked, torch.full_like(x0, MASK), x0)
    proposal = torch.where(masked, draw_tokens(model.log_probs(x_t), generator), x0)
    return x_t, proposal, (proposal != x0)


@dataclass
class HeadMetrics:
    bce: float
    auroc: float
    f1: float
    base_rate: float
    f1_all_positive: float


def evaluate_head(model: MaskedDiffusionLM, head: RemaskHead, x0: torch.Tensor, generator: torch.Generator, batch: int = 256) -> HeadMetrics:
    """BCE, AUROC and F1 of the head on proposals drawn from held-out sequences x0."""
    return evaluate_heads(model, [head], x0, generator, batch)[0]


def evaluate_heads(
    model: MaskedDiffusionLM, heads: list[RemaskHead], x0: torch.Tensor, generator: torch.Generator, batch: int = 256
) -> list[HeadMetrics]:
    """Evaluate several heads on the same proposals (one backbone pass per batch serves them all)."""
    logits: list[list[torch.Tensor]] = [[] for _ in heads]
    labels = []
    with torch.no_grad():
        for start in range(0, len(x0), batch):
            _, proposal, label = proposals(model, x0[start : start + batch], generator)
            hidden = model.net.hidden(proposal) if any(not head.blocks for head in heads) else None
            for scores, head in zip(logits, heads):
                features = hidden if not head.blocks else head.features(model, proposal)
                scores.append(head(features).flatten())
            labels.append(label.flatten())
    truth = torch.cat(labels).float()
    return [_head_metrics(torch.cat(scores), truth) for scores in logits]


def _head_metrics(score: torch.Tensor, truth: torch.Tensor) -> HeadMetrics:
    from sklearn.metrics import f1_score, roc_auc_score

    y, s = truth.numpy().astype(int), score.numpy()
    base = float(y.mean())
    if not np.isfinite(s).all():
        return HeadMetrics(float("nan"), float("nan"), float("nan"), base, 2 * base / (1 + base) if base > 0 else 0.0)
    bce = float(F.binary_cross_entropy_with_logits(score, truth))
    auroc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")
    f1 = float(f1_score(y, (s > 0).astype(int), zero_division=0.0))
    return HeadMetrics(bce, auroc, f1, base, 2 * base / (1 + base) if base > 0 else 0.0)


def train_head(
    model: MaskedDiffusionLM, x0: torch.Tensor, *, steps: int, lr: float, wd: float, seed: int, batch: int = 64,
    blocks: int = 0, progress=None,
) -> tuple[RemaskHead, list[float]]:
    """Fine-tune a fresh head (with `blocks` copied blocks) on the frozen denoiser with AdamW(lr, wd);
    return it and its losses."""
    heads, losses = train_heads(model, x0, [(lr, wd)], steps=steps, seed=seed, batch=batch, blocks=blocks, progress=progress)
    return heads[0], losses[0]


def train_heads(
    model: MaskedDiffusionLM, x0: torch.Tensor, settings: list[tuple[float, float]], *, steps: int, seed: int,
    batch: int = 64, blocks: int = 0, progress=None,
) -> tuple[list[RemaskHead], list[list[float]]]:
    """Fine-tune one fresh head per (lr, wd) on the same stream of batches; return the heads and
    each one's losses per step.

    The batches and proposals depend only on `seed`, so a head's result does not depend on which
    other settings train next to it. Heads without copied blocks share one frozen backbone pass per
    batch. A head whose loss becomes non-finite stops there: its loss list ends with that value (a
    diverging fine-tune is data).
    """
    generator = torch.Generator(device=x0.device).manual_seed(seed)
    heads, optimizers = [], []
    for lr, wd in settings:
        torch.manual_seed(seed)
        head = RemaskHead.from_denoiser(model, blocks).train()
        heads.append(head)
        optimizers.append(torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd))
    losses: list[list[float]] = [[] for _ in settings]
    for step in range(steps):
        if all(history and not np.isfinite(history[-1]) for history in losses):
            break
        index = torch.randint(len(x0), (batch,), generator=generator, device=x0.device)
        _, proposal, label = proposals(model, x0[index], generator)
        hidden = None if blocks else heads[0].features(model, proposal)  # frozen features, shared
        target = label.float()
        for head, optimizer, history in zip(heads, optimizers, losses):
            if history and not np.isfinite(history[-1]):
                continue
            features = hidden if hidden is not None else head.features(model, proposal)
            loss = F.binary_cross_entropy_with_logits(head(features), target)
            optimizer.zero_grad()
            loss.backward()
            try:
                optimizer.step()
            except RuntimeError as error:
                # AdamW raises when lr * update overflows the parameters' dtype (lr near 1e38 for
                # float32): the fine-tune has diverged, which is a result, not a failure.
                if "overflow" not in str(error):
                    raise
                history.append(float("inf"))
                continue
            history.append(float(loss.detach()))
        if progress is not None and (step + 1) % max(1, steps // 5) == 0:
            progress(step + 1, float(np.mean([np.mean(history[-20:]) for history in losses])))
    return heads, losses


def save_head(head: RemaskHead, path, metrics: dict[str, float] | None = None, denoiser: MaskedDiffusionLM | None = None) -> None:
    """Write a head checkpoint (same format as the models', kind 'head'). With `denoiser`, the
    checkpoint records its fingerprint, and `load_head` accepts the head for that denoiser only."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"dim": head.dim, "blocks": head.blocks}
    if denoiser is not None:
        config["denoiser"] = fingerprint(denoiser)
    state = {"format": CHECKPOINT_FORMAT, "kind": "head", "config": config,
             "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}, "metrics": dict(metrics or {})}
    torch.save(state, path)


def load_head(path, model: MaskedDiffusionLM) -> RemaskHead:
    """Load a head for the denoiser `model`; raises ValueError for an unusable file or a head
    trained on a denoiser of another width or depth."""
    state = read_checkpoint(path, "head")
    dim, blocks = state["config"].get("dim"), int(state["config"].get("blocks", 0))
    if dim != model.config.dim:
        raise ValueError(f"head {path} was trained on a denoiser of width {dim}, not {model.config.dim}; train it on this denoiser")
    if blocks > model.config.layers:
        raise ValueError(f"head {path} has {blocks} copied blocks, more than this denoiser's {model.config.layers}; train it on this denoiser")
    trained_on = state["config"].get("denoiser")
    if trained_on is not None and trained_on != fingerprint(model):
        raise ValueError(f"head {path} was trained on another denoiser of the same shape (weights differ); train it on this denoiser")
    head = RemaskHead(dim, blocks, model.config)
    load_state(head, state, path)
    return head.to(next(model.parameters()).device).eval()
