"""Masked diffusion: corpus, SUBS denoiser, samplers, remasking head and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from phases.data.corpus import MASK, PAD, VOCAB_SIZE, decode, encode, is_valid_statement, load_corpus
from phases.diffusion.head import RemaskHead, proposals
from phases.diffusion.model import (
    AutoregressiveLM, MaskedDiffusionLM, ModelConfig, load_checkpoint, mask_fraction, save_checkpoint,
)
from phases.diffusion.samplers import SamplerSettings, gumbel_top_k, mdlm_step, remdm_step, sample, star_step

# Significance level of every statistical test here. Each test draws from a fixed seed, so a
# failure is reproducible. A correct sampler fails one of them with probability 0.001.
ALPHA = 1e-3


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MaskedDiffusionLM(ModelConfig(length=16, dim=32, layers=1, heads=2)).eval()


def test_code_corpus_statements_parse():
    corpus = load_corpus("code", 64)
    assert len(corpus.train) > 5000
    assert set(corpus.train).isdisjoint(corpus.test)
    for text in corpus.test[:300]:
        assert is_valid_statement(text), text
        assert len(text) <= 64
    again = load_corpus("code", 64)
    assert again.valid == corpus.valid  # the split depends on the texts only


def test_english_corpus_and_round_trip():
    corpus = load_corpus("english", 64)
    assert len(corpus.train) > 1000
    tokens = encode(corpus.train[:50], 64)
    assert tokens.max() < VOCAB_SIZE
    assert decode(tokens) == list(corpus.train[:50])
    with pytest.raises(ValueError, match="does not fit in length 8"):
        encode(["far too long for eight"], 8)


def test_subs_carries_unmasked_tokens(tiny):
    x = torch.randint(2, VOCAB_SIZE, (8, 16))
    x[:, ::2] = MASK
    log_p = tiny.log_probs(x)
    assert torch.all(log_p[..., MASK] == float("-inf"))
    kept = x != MASK
    assert torch.all(log_p[kept].gather(-1, x[kept].unsqueeze(-1)) == 0.0)
    assert torch.all(torch.isinf(log_p[kept]).sum(-1) == VOCAB_SIZE - 1)


def test_mdlm_sampling_never_changes_revealed_tokens(tiny):
    generator = torch.Generator().manual_seed(1)
    x = torch.full((64, 16), MASK)
    steps = 8
    for i in range(steps):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        before = x.clone()
        x = mdlm_step(x, tiny.log_probs(x), float(mask_fraction(t)), float(mask_fraction(s)), generator)
        revealed = before != MASK
        assert torch.equal(x[revealed], before[revealed])
    assert not (x == MASK).any()  # the last step, to t = 0, reveals everything


def test_star_steps_keep_exact_mask_count_and_remask(tiny):
    generator = torch.Generator().manual_seed(2)
    x = torch.full((64, 16), MASK)
    steps, remasked = 8, 0
    for i in range(steps):
        s = 1 - (i + 1) / steps
        m_s = float(mask_fraction(s))
        before = x.clone()
        x, proposal = star_step(x, tiny.log_probs(x), m_s, generator)
        assert torch.all((x == MASK).sum(dim=1) == math.ceil(m_s * 16 - 1e-9))
        assert torch.equal(x[x != MASK], proposal[x != MASK])
        remasked += int(((before != MASK) & (x == MASK)).sum())
    assert remasked > 0  # tokens revealed earlier were masked again


def test_gstar_sampler_counts_passes(tiny):
    head = RemaskHead(32)
    settings = SamplerSettings("gstar", steps=8, t_on=0.5, tau=1.0)
    result = sample(tiny, settings, 20, 16, head=head, generator=torch.Generator().manual_seed(3))
    assert result.tokens.shape == (20, 16)
    assert not (result.tokens == MASK).any()
    # Steps at t = 1, 0.875, ..., 0.125: those with t <= 0.5 (4 of 8) are star steps. The last one
    # (to s = 0) masks nothing, so only 3 need the head.
    assert result.denoiser_passes == 8
    assert result.head_passes == 3
    with pytest.raises(ValueError, match="needs a remasking head"):
        sample(tiny, SamplerSettings("gstar", steps=4), 2, 16)


def _category_counts(draws: torch.Tensor, categories: int) -> np.ndarray:
    """Counts (positions, categories) of the tokens drawn at each position over many draws."""
    return np.stack([np.bincount(draws[:, i].numpy(), minlength=categories) for i in range(draws.shape[1])])


def test_star_step_matches_remdm():
    # Fixed p(x0 | x_t) over tokens 2..6; four masked and four revealed positions. The star step
    # with independent masking and the ReMDM step with sigma = 1 - alpha_s (= m_s) must give every
    # position the same distribution over {mask, tokens}. A chi-square test of homogeneity per
    # position, Bonferroni-corrected over the 8 positions, at level ALPHA.
    generator = torch.Generator().manual_seed(4)
    draws, length = 20000, 8
    logits = torch.full((draws, length, VOCAB_SIZE), float("-inf"))
    logits[..., 2:7] = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.15, 0.05]))
    x = torch.tensor([MASK, 3, MASK, 4, MASK, 5, MASK, 6]).repeat(draws, 1)
    m_t, m_s = 0.6, 0.35
    star, _ = star_step(x, logits, m_s, generator, exact_count=False)
    remdm = remdm_step(x, logits, m_t, m_s, m_s, generator)
    a, b = _category_counts(star, 7), _category_counts(remdm, 7)
    for position in range(length):
        table = np.stack([a[position], b[position]])
        table = table[:, table.sum(axis=0) > 0]
        p_value = stats.chi2_contingency(table)[1] if table.shape[1] > 1 else 1.0
        assert p_value > ALPHA / length, (position, table)
    # Both mask a revealed token with probability m_s, and reveal a masked one with 1 - m_s.
    assert (star[:, 1] == MASK).float().mean() == pytest.approx(m_s, abs=0.015)


def test_infinite_tau_selects_positions_uniformly():
    # Strongly unequal scores; at tau = 1e12 every position is chosen with probability k / L.
    generator = torch.Generator().manual_seed(5)
    scores = torch.linspace(0, 8, 10).repeat(20000, 1)
    chosen = gumbel_top_k(scores, 3, 1e12, generator)
    counts = chosen.sum(dim=0).numpy()
    assert stats.chisquare(counts).pvalue > ALPHA
    assert torch.all(chosen.sum(dim=1) == 3)


def test_gumbel_top_k_laws():
    generator = torch.Generator().manual_seed(6)
    base = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0])
    chosen = gumbel_top_k(base.repeat(20000, 1), 1, 1.0, generator)
    expected = torch.softmax(base, 0).numpy() * 20000
    assert stats.chisquare(chosen.sum(dim=0).numpy(), expected).pvalue > ALPHA
    cold = gumbel_top_k(base.repeat(100, 1), 2, 1e-6, generator)
    assert torch.all(cold[:, 3:])
    assert not cold[:, :3].any()


def test_head_labels_are_zero_where_unmasked(tiny):
    x0 = torch.randint(2, VOCAB_SIZE, (256, 16))
    x_t, proposal, labels = proposals(tiny, x0, torch.Generator().manual_seed(7))
    assert not labels[x_t != MASK].any()
    assert torch.equal(proposal[x_t != MASK], x0[x_t != MASK])
    assert labels.float().mean() <= (x_t == MASK).float().mean()
    assert labels.any()  # an untrained denoiser makes mistakes


def test_denoiser_loss_falls_when_fitting_a_batch():
    torch.manual_seed(8)
    model = MaskedDiffusionLM(ModelConfig(length=16, dim=32, layers=1, heads=2))
    x0 = encode(["x = 1", "y = x + 2", "return y", "pass"], 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(9)
    first = float(model.loss(x0.repeat(16, 1), generator).detach())
    for _ in range(150):
        loss = model.loss(x0.repeat(16, 1), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(model.loss(x0.repeat(16, 1), generator).detach()) < 0.5 * first


def test_checkpoint_round_trip_and_errors(tiny, tmp_path):
    path = tmp_path / "denoiser.pt"
    save_checkpoint(tiny, path, "denoiser", {"valid_loss": 1.5})
    loaded, metrics = load_checkpoint(path, "denoiser")
    x = torch.randint(2, VOCAB_SIZE, (4, 16))
    x[:, :5] = MASK
    assert torch.equal(loaded.log_probs(x), tiny.log_probs(x))
    assert metrics == {"valid_loss": 1.5}

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="is not a readable torch file"):
        load_checkpoint(corrupt, "denoiser")
    state = torch.load(path, weights_only=True)
    state["config"]["dim"] = 48
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    with pytest.raises(ValueError, match="does not match its config's architecture"):
        load_checkpoint(wrong, "denoiser")
    with pytest.raises(ValueError, match="contains a 'denoiser' model, but a 'reference' model is needed"):
        load_checkpoint(path, "reference")
    with pytest.raises(ValueError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt", "denoiser")


def test_reference_model_scores_sequences():
    torch.manual_seed(10)
    model = AutoregressiveLM(ModelConfig(length=16, dim=32, layers=1, heads=2, causal=True))
    tokens = encode(["x = 1", "pass"], 16)
    nll = model.nll(tokens, torch.tensor([6, 5]))
    assert nll.shape == (2,)
    assert torch.all(torch.isfinite(nll))
    assert float(nll.mean()) == pytest.approx(math.log(VOCAB_SIZE), rel=0.3)  # untrained: near uniform
    assert PAD == 0


def test_head_training_and_checkpoint(tiny, tmp_path):
    from phases.diffusion.head import evaluate_head, load_head, save_head, train_head

    x0 = torch.randint(2, VOCAB_SIZE, (128, 16))
    head, losses = train_head(tiny, x0, steps=30, lr=1e-2, wd=0.0, seed=0, batch=32)
    assert len(losses) == 30
    assert all(np.isfinite(losses))
    metrics = evaluate_head(tiny, head, x0, torch.Generator().manual_seed(11))
    assert 0.0 <= metrics.auroc <= 1.0
    assert 0.0 < metrics.base_rate < 1.0
    assert metrics.f1_all_positive == pytest.approx(2 * metrics.base_rate / (1 + metrics.base_rate))
    save_head(head, tmp_path / "head.pt", {"auroc": metrics.auroc})
    hidden = torch.randn(2, 16, 32)
    assert torch.equal(load_head(tmp_path / "head.pt", tiny)(hidden), head(hidden))
    wider = MaskedDiffusionLM(ModelConfig(length=16, dim=64, layers=1, heads=2))
    with pytest.raises(ValueError, match="was trained on a denoiser of width 32, not 64"):
        load_head(tmp_path / "head.pt", wider)
    save_head(head, tmp_path / "pinned.pt", denoiser=tiny)
    assert torch.equal(load_head(tmp_path / "pinned.pt", tiny)(hidden), head(hidden))
    torch.manual_seed(1)
    twin = MaskedDiffusionLM(ModelConfig(length=16, dim=32, layers=1, heads=2))
    with pytest.raises(ValueError, match="trained on another denoiser of the same shape"):
        load_head(tmp_path / "pinned.pt", twin)


def test_head_with_copied_blocks(tmp_path):
    # A head that owns a copy of the denoiser's first block starts from the denoiser's weights,
    # learns while the denoiser stays frozen, and round-trips through its checkpoint.
    from phases.diffusion.head import RemaskHead, load_head, save_head, train_head

    torch.manual_seed(0)
    model = MaskedDiffusionLM(ModelConfig(length=16, dim=32, layers=2, heads=2)).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fresh = RemaskHead.from_denoiser(model, blocks=1)
    first_block = model.net.blocks.layers[0].state_dict()
    for name, value in fresh.layers.layers[0].state_dict().items():
        assert torch.equal(value, first_block[name]), name
    assert torch.equal(fresh.embed.weight, model.net.embed.weight)
    assert len(fresh.layers.layers) == 1

    x0 = torch.randint(2, VOCAB_SIZE, (128, 16))
    head, losses = train_head(model, x0, steps=60, lr=3e-3, wd=0.0, seed=0, batch=32, blocks=1)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not torch.equal(head.layers.layers[0].linear1.weight, model.net.blocks.layers[0].linear1.weight)

    save_head(head, tmp_path / "head.pt")
    proposal = torch.randint(2, VOCAB_SIZE, (3, 16))
    loaded = load_head(tmp_path / "head.pt", model)
    assert loaded.blocks == 1
    assert torch.allclose(loaded.scores(model, proposal), head.eval().scores(model, proposal))
    result = sample(model, SamplerSettings("gstar", steps=8, t_on=0.5), 5, 16, head=loaded, generator=torch.Generator().manual_seed(0))
    assert result.head_passes == 3
    with pytest.raises(ValueError, match="head blocks must be between 0 and the denoiser's 2 layers, got 3"):
        RemaskHead.from_denoiser(model, blocks=3)
    shallow = MaskedDiffusionLM(ModelConfig(length=16, dim=32, layers=1, heads=2))
    save_head(RemaskHead.from_denoiser(model, blocks=2), tmp_path / "deep.pt")
    with pytest.raises(ValueError, match="has 2 copied blocks, more than this denoiser's 1"):
        load_head(tmp_path / "deep.pt", shallow)


def test_mdm_commands_pretrain_and_sample(tmp_path):
    import json

    from typer.testing import CliRunner

    from phases.cli import app

    tiny_model = ["--dim", "32", "--layers", "1", "--heads", "2", "--length", "32", "--steps", "10", "--batch", "8"]
    runner = CliRunner()
    result = runner.invoke(app, ["mdm", "pretrain", *tiny_model, "--out", str(tmp_path / "d.pt")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["mdm", "pretrain-reference", *tiny_model, "--out", str(tmp_path / "r.pt")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["mdm", "sample", "--checkpoint", str(tmp_path / "d.pt"), "--reference", str(tmp_path / "r.pt"),
                                 "--sampler", "remdm", "--steps", "4", "--count", "8", "--show", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["denoiser_passes"] == 4
    assert metrics["reference_perplexity"] > 1.0
    result = runner.invoke(app, ["mdm", "compare", "--checkpoint", str(tmp_path / "d.pt"), "--samplers", "mdlm,gstar", "--steps", "2,4",
                                 "--seeds", "1", "--count", "4", "--out", str(tmp_path / "compare.json")])
    assert result.exit_code == 0, result.output
    assert [row["steps"] for row in json.loads((tmp_path / "compare.json").read_text())] == [2, 4]  # gstar left out: no head
    assert "| mdlm | 4 |" in (tmp_path / "compare.md").read_text()
    result = runner.invoke(app, ["mdm", "train-head", "--checkpoint", str(tmp_path / "d.pt"), "--steps", "5", "--batch", "8",
                                 "--out", str(tmp_path / "h.pt")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0.0 <= report["auroc"] <= 1.0
    assert report["base_rate"] > 0
    result = runner.invoke(app, ["mdm", "sample", "--checkpoint", str(tmp_path / "d.pt"), "--head", str(tmp_path / "h.pt"),
                                 "--sampler", "gstar", "--steps", "4", "--t-on", "0.5", "--count", "4", "--show", "0"])
    assert result.exit_code == 0, result.output
    # Of t = 1, 0.75, 0.5 and 0.25, the last two are star steps; the last masks nothing, so one head pass.
    assert json.loads(result.stdout)["head_passes"] == 1
    result = runner.invoke(app, ["mdm", "sample", "--checkpoint", str(tmp_path / "r.pt")])
    assert result.exit_code == 2
    assert "contains a 'reference' model, but a 'denoiser' model is needed" in " ".join(result.output.split())
    result = runner.invoke(app, ["mdm", "pretrain", "--dim", "30", "--heads", "4"])
    assert result.exit_code == 2
    assert "--dim 30 must be a multiple of --heads 4" in " ".join(result.output.split())


def test_compare_samplers_reports_mean_and_std(tiny):
    from phases.diffusion.compare import compare_samplers, markdown_table

    settings = [SamplerSettings("mdlm", 4), SamplerSettings("gstar", 4, t_on=0.6)]
    rows = compare_samplers(tiny, settings, seeds=2, count=6, head=RemaskHead(32))
    assert [row["sampler"] for row in rows] == ["mdlm", "gstar"]
    for row in rows:
        assert len(row["validity_per_seed"]) == 2
        assert row["validity_mean"] == pytest.approx(np.mean(row["validity_per_seed"]))
        assert row["reference_perplexity_mean"] is None  # no reference model given
    assert rows[0]["forward_passes"] == 4
    assert rows[1]["head_passes"] == 1  # t = 0.5 and 0.25 are <= t_on, and the step from 0.25 masks nothing
    assert "| gstar | 4 | 5 |" in markdown_table(rows)
