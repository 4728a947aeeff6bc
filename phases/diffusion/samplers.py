"""Batched samplers for the masked-diffusion model, with every network pass counted.

Time runs from t = 1 (all masked) to t = 0 in `steps` equal steps, t -> s = t - 1/steps. The mask
fraction m(t) is the model's log-linear schedule, except under the `loop` schedule:
m falls linearly from 1 at t = 1 to m_on at t_on, stays at m_on until t_off, then falls linearly to
0 (ReMDM-loop's constants: t_on 0.55, t_off 0.05, m_on 0.1).

Samplers:

- `mdlm`: ancestral steps. A masked token is revealed with probability (m_t - m_s) / m_t, drawn
  from p(x0 | x_t); revealed tokens never change.
- `remdm`: ReMDM. A revealed token is remasked with probability sigma_t, and a masked token is
  revealed with probability (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t), alpha = 1 - m.
  `cap`: sigma = min(eta, sigma_max); `rescale`: sigma = eta sigma_max, with
  sigma_max = min(1, (1 - alpha_s) / alpha_t); `loop`: sigma = eta on the loop plateau, 0 elsewhere.
- `star`: star-shaped steps with random remasking. A step draws a complete proposal x0_hat (every
  masked position from p(x0 | x_t), the others carried over), then masks exactly
  ceil(m_s L) positions of it, chosen uniformly, so earlier tokens can be masked again. Gated:
  MDLM steps while t > t_on (schedule `linear`), or star steps only on the loop plateau (`loop`).
- `gstar`: as `star`, but the positions to mask are drawn by Gumbel top-k on the remasking head's
  error logits at temperature tau: tau -> infinity is uniform, tau -> 0 the deterministic top-k.

After the last step, one argmax pass fills any position still masked (none under the schedules
here, which end at m = 0, so it is counted only when it runs). `SampleResult` counts denoiser
passes and head passes (each a backbone pass over the proposal) per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from phases.data.corpus import MASK
from phases.diffusion.model import mask_fraction

SAMPLERS = ("mdlm", "remdm", "star", "gstar")
REMDM_MODES = ("cap", "rescale", "loop")
SCHEDULES = ("linear", "loop")
LOOP_T_ON, LOOP_T_OFF, LOOP_MASK = 0.55, 0.05, 0.1


@dataclass(frozen=True)
class SamplerSettings:
    """Options of the samplers; each uses only its own."""

    sampler: str = "mdlm"
    steps: int = 32
    schedule: str = "linear"  # star, gstar: `linear` (gated by t_on) or `loop`
    t_on: float = 0.3  # star, gstar with the linear schedule: star steps for t <= t_on
    remdm_mode: str = "rescale"
    eta: float = 0.015  # remdm: remasking rate parameter
    tau: float = 1.0  # gstar: temperature of the error logits
    exact_count: bool = True  # star: mask exactly ceil(m_s L) positions (False: each with probability m_s)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if self.remdm_mode not in REMDM_MODES:
            raise ValueError(f"unknown ReMDM mode {self.remdm_mode!r}; allowed: {', '.join(REMDM_MODES)}")
        if not 0.0 <= self.t_on <= 1.0 or self.eta < 0 or self.tau <= 0:
            raise ValueError(f"need 0 <= t_on <= 1, eta >= 0 and tau > 0; got t_on {self.t_on}, eta {self.eta}, tau {self.tau}")


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (N, L)
    denoiser_passes: int  # per sample
    head_passes: int  # per sample

    @property
    def forward_passes(self) -> int:
        return self.denoiser_passes + self.head_passes


def loop_mask_fraction(t: float) -> float:
    """m(t) of the loop schedule."""
    if t >= LOOP_T_ON:
        return LOOP_MASK + (1.0 - LOOP_MASK) * (t - LOOP_T_ON) / (1.0 - LOOP_T_ON)
    if t >= LOOP_T_OFF:
        return LOOP_MASK
    return LOOP_MASK * t / LOOP_T_OFF


def draw_tokens(log_p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per position from log-probabilities (N, L, V), by Gumbel argmax."""
    uniform = torch.rand(log_p.shape, generator=generator, device=log_p.device).clamp_(1e-20, 1.0)
    return (log_p - torch.log(-torch.log(uniform))).argmax(dim=-1)


def gumbel_top_k(scores: torch.Tensor, k: int, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """Boolean mask (N, L) of k positions per row drawn without replacement with probabilities
    proportional to softmax(scores / tau) (Plackett-Luce), by adding Gumbel noise and taking the top k."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(1e-20, 1.0)
    perturbed = scores / tau - torch.log(-torch.log(uniform))
    chosen = perturbed.topk(min(k, scores.shape[1]), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)


def mdlm_step(x: torch.Tensor, log_p: torch.Tensor, m_t: float, m_s: float, generator: torch.Generator | None) -> torch.Tensor:
    """Ancestral step: reveal each masked token with probability (m_t - m_s) / m_t."""
    masked = x == MASK
    reveal = masked & (torch.rand(x.shape, generator=generator, device=x.device) < (m_t - m_s) / m_t)
    return torch.where(reveal, draw_tokens(log_p, generator), x)


def remdm_step(x: torch.Tensor, log_p: torch.Tensor, m_t: float, m_s: float, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """ReMDM step: remask revealed tokens with probability sigma, reveal masked ones with
    probability (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t)."""
    alpha_t, alpha_s = 1.0 - m_t, 1.0 - m_s
    masked = x == MASK
    uniform = torch.rand(x.shape, generator=generator, device=x.device)
    reveal_probability = (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t)
    reveal = masked & (uniform < reveal_probability)
    remask = ~masked & (uniform < sigma)
    out = torch.where(reveal, draw_tokens(log_p, generator), x)
    return torch.where(remask, torch.full_like(x, MASK), out)


def remdm_sigma(mode: str, eta: float, m_t: float, m_s: float, on_plateau: bool) -> float:
    alpha_t, alpha_s = 1.0 - m_t, 1.0 - m_s
    sigma_max = min(1.0, (1.0 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0
    if mode == "cap":
        return min(eta, sigma_max)
    if mode == "rescale":
        return eta * sigma_max
    return min(eta, sigma_max) if on_plateau else 0.0


def star_step(
    x: torch.Tensor, log_p: torch.Tensor, m_s: float, generator: torch.Generator | None,
    scores: Callable[[torch.Tensor], torch.Tensor] | None = None, tau: float = 1.0, exact_count: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take a star-shaped step and return (x_s, the proposal x0_hat).

    The proposal fills every masked position. Then exactly ceil(m_s L) positions are masked,
    chosen uniformly or by Gumbel top-k on `scores(x0_hat) / tau`. With `exact_count=False`, each
    position is masked independently with probability m_s instead."""
    proposal = torch.where(x == MASK, draw_tokens(log_p, generator), x)
    length = x.shape[1]
    if not exact_count:
        remask = torch.rand(x.shape, generator=generator, device=x.device) < m_s
    else:
        count = min(length, max(0, math.ceil(m_s * length - 1e-9)))
        if count == 0:
            remask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        else:
            logits = torch.zeros(x.shape, device=x.device) if scores is None else scores(proposal)
            remask = gumbel_top_k(logits, count, tau if scores is not None else 1.0, generator)
    return torch.where(remask, torch.full_like(proposal, MASK), proposal), proposal


@torch.no_grad()
def sample(
    model, settings: SamplerSettings, count: int, length: int, *, head=None, generator: torch.Generator | None = None,
    batch: int = 256, device: torch.device | str = "cpu",
) -> SampleResult:
    """Draw `count` samples of `length` tokens; `head` (a RemaskHead) is needed for gstar."""
    if settings.sampler == "gstar" and head is None:
        raise ValueError("the gstar sampler needs a remasking head; train one with the remask kind or pass head=")
    outputs, denoiser, heads = [], 0, 0
    for start in range(0, count, batch):
        n = min(batch, count - start)
        x = torch.full((n, length), MASK, dtype=torch.long, device=device)
        denoiser, heads = 0, 0
        for i in range(settings.steps):
            t, s = 1.0 - i / settings.steps, 1.0 - (i + 1) / settings.steps
            loop = settings.schedule == "loop" or (settings.sampler == "remdm" and settings.remdm_mode == "loop")
            m_t = loop_mask_fraction(t) if loop else float(mask_fraction(t))
            m_s = loop_mask_fraction(s) if loop else float(mask_fraction(s))
            on_plateau = loop and LOOP_T_OFF <= s and t <= LOOP_T_ON + 1e-12
            if not (x == MASK).any() and settings.sampler == "mdlm":
                continue  # nothing left to reveal: MDLM would change nothing
            hidden = model.net.hidden(x)
            log_p = model.log_probs(x, hidden)
            denoiser += 1
            if settings.sampler == "mdlm":
                x = mdlm_step(x, log_p, m_t, m_s, generator)
            elif settings.sampler == "remdm":
                x = remdm_step(x, log_p, m_t, m_s, remdm_sigma(settings.remdm_mode, settings.eta, m_t, m_s, on_plateau), generator)
            else:
                star_now = on_plateau if settings.schedule == "loop" else t <= settings.t_on + 1e-12
                if not star_now:
                    x = mdlm_step(x, log_p, m_t, m_s, generator) if m_t > 0 else x
                    continue
                scores = None
                # The head only chooses which positions to mask again; a step that masks none (the
                # last one, s = 0) needs no head pass.
                remasks = math.ceil(m_s * length - 1e-9)
                if settings.sampler == "gstar" and settings.exact_count and remasks > 0:
                    def scores(proposal: torch.Tensor) -> torch.Tensor:
                        return head.scores(model, proposal)
                    heads += 1
                x, _ = star_step(x, log_p, m_s, generator, scores, settings.tau, settings.exact_count)
        if (x == MASK).any():
            log_p = model.log_probs(x)
            denoiser += 1
            x = torch.where(x == MASK, log_p.argmax(dim=-1), x)
        outputs.append(x.cpu())
    return SampleResult(torch.cat(outputs), denoiser, heads)
