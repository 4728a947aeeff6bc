"""Sampling throughput of the masked-diffusion samplers, measured in the same run.

(a) Tokens per second of each sampler (mdlm, remdm, star, gstar) drawing a batch of 256 sequences
    of 64 tokens at 32 steps, with the default denoiser size (width 128, 4 blocks). Throughput does
    not depend on the weights, so the model is freshly initialised, not trained.
(b) The cost of one G-Star step (denoiser pass, proposal, head pass over the proposal, Gumbel
    top-k) against one MDLM step (denoiser pass and reveal), timed on the same batch.

Usage: python bench/diffusion.py [--quick] [--threads N] [--out bench/out/diffusion.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phases.data.corpus import MASK  # noqa: E402
from phases.diffusion.head import RemaskHead  # noqa: E402
from phases.diffusion.model import MaskedDiffusionLM, ModelConfig, parameter_count  # noqa: E402
from phases.diffusion.samplers import SamplerSettings, mdlm_step, sample, star_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH, LENGTH, STEPS = 256, 64, 32


def best_of(action, repeats: int) -> float:
    """Smallest wall time of `repeats` calls, after one warm-up call."""
    action()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; for a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "diffusion.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else 3
    torch.manual_seed(0)
    model = MaskedDiffusionLM(ModelConfig(length=LENGTH)).eval()
    head = RemaskHead(model.config.dim).eval()
    print(f"denoiser: {parameter_count(model):,} parameters, batch {BATCH} x {LENGTH} tokens, {STEPS} steps, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    samplers = {
        "mdlm": SamplerSettings("mdlm", STEPS),
        "remdm (rescale)": SamplerSettings("remdm", STEPS, remdm_mode="rescale"),
        "star (t_on 0.3)": SamplerSettings("star", STEPS, t_on=0.3),
        "gstar (t_on 0.3)": SamplerSettings("gstar", STEPS, t_on=0.3),
        "gstar (loop)": SamplerSettings("gstar", STEPS, schedule="loop"),
    }
    rows = []
    for name, settings in samplers.items():
        generator = torch.Generator().manual_seed(1)
        result = sample(model, settings, BATCH, LENGTH, head=head, generator=generator, batch=BATCH)
        seconds = best_of(lambda: sample(model, settings, BATCH, LENGTH, head=head, generator=generator, batch=BATCH), repeats)
        rows.append({"sampler": name, "seconds": seconds, "tokens_per_s": BATCH * LENGTH / seconds,
                     "denoiser_passes": result.denoiser_passes, "head_passes": result.head_passes})
        print(f"{name}: {BATCH * LENGTH / seconds:,.0f} tokens/s ({seconds:.2f} s per batch; "
              f"{result.denoiser_passes} denoiser + {result.head_passes} head passes per sample)", flush=True)

    generator = torch.Generator().manual_seed(2)
    x = torch.randint(2, model.config.vocab, (BATCH, LENGTH))
    x[:, ::3] = MASK

    @torch.no_grad()
    def one_mdlm_step() -> None:
        mdlm_step(x, model.log_probs(x), 0.5, 0.45, generator)

    @torch.no_grad()
    def one_gstar_step() -> None:
        def scores(proposal: torch.Tensor) -> torch.Tensor:
            return head(model.net.hidden(proposal))

        star_step(x, model.log_probs(x), 0.45, generator, scores, 1.0)

    mdlm_seconds = best_of(one_mdlm_step, 3 * repeats)
    gstar_seconds = best_of(one_gstar_step, 3 * repeats)
    print(f"one step: mdlm {1e3 * mdlm_seconds:.1f} ms, gstar {1e3 * gstar_seconds:.1f} ms -> {gstar_seconds / mdlm_seconds:.2f}x", flush=True)

    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"), "batch": BATCH, "length": LENGTH, "steps": STEPS,
        "parameters": parameter_count(model), "samplers": rows,
        "step_seconds": {"mdlm": mdlm_seconds, "gstar": gstar_seconds, "ratio": gstar_seconds / mdlm_seconds},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
