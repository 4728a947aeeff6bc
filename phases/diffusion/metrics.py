"""Quality and diversity of a set of samples.

- `validity`: the fraction of samples whose text (up to the first padding token) `ast.parse`
  accepts; meaningful for the code corpus.
- `reference_perplexity`: exp of the mean negative log-likelihood per token under the
  autoregressive reference model trained on the same corpus (`phases mdm pretrain-reference`), the
  local stand-in for a generative perplexity. Its numbers are comparable only between samplers
  scored by the same reference model.
- `distinct_n` for n = 1, 2, 3: unique word n-grams over all n-grams, pooled over the sample set
  (words split at whitespace); `unigram_entropy`: the entropy (nats) of the pooled word
  distribution. Quality numbers must be read together with these: a sampler can lower perplexity
  by repeating itself.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from phases.data.corpus import PAD, decode, is_valid_statement


def validity(texts: list[str]) -> float:
    return sum(is_valid_statement(t) for t in texts) / max(1, len(texts))


def distinct_n(texts: list[str], n: int) -> float | None:
    """Return distinct word n-grams over all word n-grams; None when the texts have no n-gram."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else None


def unigram_entropy(texts: list[str]) -> float:
    counts = Counter(word for text in texts for word in text.split())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


@torch.no_grad()
def reference_perplexity(reference, tokens: torch.Tensor, batch: int = 256) -> float:
    """exp(mean NLL per token) of samples (N, L) under the reference model, each scored up to and
    including its first padding token."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens), batch):
        part = tokens[start : start + batch]
        is_pad = part == PAD
        # Predicted positions are 1..L-1; a text of length k is scored on its k-1 later characters
        # and on the padding token that ends it (when it fits).
        lengths = torch.where(is_pad.any(dim=1), is_pad.float().argmax(dim=1), torch.full((len(part),), part.shape[1] - 1))
        lengths = lengths.clamp(min=1)
        nll += float((reference.nll(part, lengths) * lengths).sum())
        count += int(lengths.sum())
    return math.exp(nll / max(1, count))


def sample_metrics(tokens: torch.Tensor, reference=None, corpus: str = "code") -> dict[str, float | None]:
    """Compute every metric of a sample set (N, L); the perplexity needs a reference model."""
    texts = decode(tokens)
    return {
        "validity": validity(texts) if corpus == "code" else None,
        "reference_perplexity": reference_perplexity(reference, tokens) if reference is not None else None,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "unigram_entropy": unigram_entropy(texts),
        "mean_length": sum(len(t) for t in texts) / max(1, len(texts)),
    }
