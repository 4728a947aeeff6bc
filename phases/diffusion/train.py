"""Pretraining of the masked-diffusion denoiser and of the autoregressive reference model.

Both train with AdamW (weight decay 0.01) on random batches of the corpus's train split. The
learning rate warms up linearly over 5% of the steps, then decays by a cosine to a tenth of the
peak. Both report the loss on the valid split. The reference model scores samples: its mean negative log-likelihood
per token, exponentiated, is the generative-perplexity analogue of `phases.diffusion.metrics`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from phases.data.corpus import encode, load_corpus
from phases.diffusion.model import AutoregressiveLM, MaskedDiffusionLM, ModelConfig, cosine_lr, parameter_count, save_checkpoint


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of a pretraining run."""

    steps: int = 2200
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0
    eval_every: int = 500
    eval_sequences: int = 512


def pretrain(
    config: ModelConfig, settings: TrainSettings, out: str | Path, *, reference: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train a denoiser (or, with `reference`, the autoregressive model) and write its checkpoint;
    return the final metrics (train and valid loss per token, seconds)."""
    if settings.steps < 1 or settings.batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {settings.steps} and {settings.batch}")
    say = progress or (lambda message: None)

    corpus = load_corpus(config.corpus, config.length)
    config = replace(config, causal=reference, python_version=corpus.python_version)
    train, valid = encode(corpus.train, config.length), encode(corpus.valid, config.length)[: settings.eval_sequences]
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = AutoregressiveLM(config) if reference else MaskedDiffusionLM(config)

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    warmup = max(1, settings.steps // 20)
    what = "reference model" if reference else "denoiser"
    say(f"{what}: {parameter_count(model):,} parameters, {len(train):,} training sequences of {config.length} tokens "
        f"({config.corpus} corpus), {settings.steps} steps of batch {settings.batch}")

    started = time.perf_counter()
    recent: list[float] = []
    metrics: dict[str, float] = {}
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.steps, settings.lr, warmup)
        batch = train[torch.randint(len(train), (settings.batch,), generator=generator)]
        model.train()
        loss = model.loss(batch) if reference else model.loss(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [float(loss.detach())])[-100:]

        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            valid_loss = evaluate_loss(model, valid, reference, settings.seed)
            metrics = {"train_loss": sum(recent) / len(recent), "valid_loss": valid_loss, "steps": step + 1,
                       "seconds": time.perf_counter() - started}
            say(f"step {step + 1}/{settings.steps}: train loss {metrics['train_loss']:.4f}, valid loss {valid_loss:.4f} per token "
                f"({metrics['seconds']:.0f} s)")

    model.eval()
    save_checkpoint(model, out, "reference" if reference else "denoiser", metrics)
    say(f"checkpoint written to {out}")
    return metrics


@torch.no_grad()
def evaluate_loss(model, tokens: torch.Tensor, reference: bool, seed: int, batch: int = 256) -> float:
    """Mean loss per token over `tokens` (the MDLM bound for a denoiser, the NLL for the reference)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    total = 0.0
    for start in range(0, len(tokens), batch):
        part = tokens[start : start + batch]
        loss = model.loss(part) if reference else model.loss(part, generator)
        total += float(loss) * len(part)
    return total / max(1, len(tokens))
