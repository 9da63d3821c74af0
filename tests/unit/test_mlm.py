"""The masked LM: the loader's masking statistics (packed and padded rows), its loss against the
manual ``F.cross_entropy(ignore_index)`` path, the masked-token accuracy, no attention across
packed documents, and the x-transformers ``Encoder`` that computes the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xft_dist import Encoder, TransformerWrapper
from xft_dist.config.load import validate
from xft_dist.data import IGNORE_INDEX, Batch, LoaderConfig, StreamingLoader
from xft_dist.data.packing import mlm_corrupt
from xft_dist.models import MaskedLMWrapper
from xft_dist.models.factory import build_model
from xft_dist.nn import vocab_parallel_correct
from xft_dist.parallel import ParallelGroups

from ..helpers import make_corpus

PAD, EOS, BOS, TOK_VOCAB = 0, 1, 2, 259  # the byte tokenizer's; the mask id is TOK_VOCAB
MASK_ID = TOK_VOCAB


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm")
    make_corpus(out, num_docs=600, shard_tokens=4000, max_len=90)
    return out


def _loader_cfg(rows: str, **kw) -> LoaderConfig:
    return LoaderConfig(seq_len=128, global_rows=16, num_streams=4, mode="mlm", seed=5, mlm_rows=rows, **kw)


@pytest.mark.parametrize("rows", ["packed", "padded"])
def test_masking_statistics_of_the_loaders_batches(corpus, rows):
    it = iter(StreamingLoader(corpus, _loader_cfg(rows), vocab_size=TOK_VOCAB + 1))
    batches = [next(it) for _ in range(40)]
    inp = torch.cat([b.input_ids for b in batches])
    lab = torch.cat([b.labels for b in batches])
    real = torch.cat([b.mask for b in batches])
    chosen = lab != IGNORE_INDEX
    # The originals: the inputs where nothing was chosen, the labels where something was.
    orig = torch.where(chosen, lab, inp)
    special = (orig == EOS) | (orig == PAD) | (orig == BOS)
    candidates = real & ~special
    assert not (chosen & ~real).any(), "padding chosen"
    assert not (chosen & special).any(), "a separator / special id chosen"
    assert (special & real).any() and (~real).any() == (rows == "padded")  # separators (and padding) were there
    frac = chosen.sum().item() / candidates.sum().item()
    assert abs(frac - 0.15) <= 0.01, f"chosen fraction {frac:.4f}"
    n = chosen.sum().item()
    masked = (inp[chosen] == MASK_ID).sum().item() / n
    kept = (inp[chosen] == lab[chosen]).sum().item() / n
    randomised = 1 - masked - kept
    for name, got, want in (("mask", masked, 0.8), ("random", randomised, 0.1), ("keep", kept, 0.1)):
        assert abs(got - want) <= 0.02, f"{name} fraction {got:.4f}, expected {want}"
    assert not (inp[~chosen] == MASK_ID).any()  # only chosen positions are corrupted
    assert sum(b.num_loss_tokens for b in batches) == n
    if rows == "packed":  # several documents per row, positions restarting with each
        b = batches[0]
        assert (b.doc_ids.max(dim=1).values > 0).all() and b.layout is not None
        assert ((b.positions == 0) == torch.cat([torch.ones(b.rows, 1, dtype=torch.bool),
                                                b.doc_ids[:, 1:] != b.doc_ids[:, :-1]], dim=1)).all()


def test_mlm_corrupt_honours_probability_and_replace():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, size=(64, 256))
    out = mlm_corrupt(tokens, np.ones_like(tokens, dtype=bool), np.zeros_like(tokens), np.zeros_like(tokens),
                      rng=rng, probability=0.3, replace=(0.0, 0.0, 1.0), mask_id=MASK_ID, vocab_size=TOK_VOCAB,
                      special=[EOS])
    chosen = out["loss_mask"] > 0
    assert abs(chosen.mean() - 0.3) < 0.01 and (out["input_ids"] == tokens).all()  # all kept
    out = mlm_corrupt(tokens, np.ones_like(tokens, dtype=bool), np.zeros_like(tokens), np.zeros_like(tokens),
                      rng=rng, probability=0.5, replace=(1.0, 0.0, 0.0), mask_id=MASK_ID, vocab_size=TOK_VOCAB)
    chosen = out["loss_mask"] > 0
    assert (out["input_ids"][chosen] == MASK_ID).all() and (out["input_ids"][~chosen] == tokens[~chosen]).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_masks_are_seeded_and_resume_exactly(corpus, workers):
    cfg = _loader_cfg("packed", num_workers=workers)
    it = iter(StreamingLoader(corpus, cfg, vocab_size=TOK_VOCAB + 1))
    straight = [next(it) for _ in range(6)]
    first = StreamingLoader(corpus, cfg, vocab_size=TOK_VOCAB + 1)
    it = iter(first)
    [next(it) for _ in range(4)]
    resumed = StreamingLoader(corpus, cfg, vocab_size=TOK_VOCAB + 1)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for want in straight[4:]:
        got = next(it)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    other = iter(StreamingLoader(corpus, _loader_cfg("packed", mlm_probability=0.2), vocab_size=TOK_VOCAB + 1))
    assert not torch.equal(next(other).labels, straight[0].labels)


def _model(cfg_extra=None, fused=True):
    cfg = validate({"model": {"kind": "encoder", "dim": 32, "depth": 2, "heads": 4, "fused_loss": fused,
                              **(cfg_extra or {})},
                    "data": {"shards": "x", "mode": "mlm", "seq_len": 128, "num_streams": 4}})
    torch.manual_seed(0)
    return build_model(cfg, ParallelGroups.single(), None, num_tokens=TOK_VOCAB + 1, pad_id=PAD)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("rows", ["packed", "padded"])
def test_loss_is_the_manual_cross_entropy_over_chosen_tokens(corpus, rows, fused):
    batch = next(iter(StreamingLoader(corpus, _loader_cfg(rows), vocab_size=TOK_VOCAB + 1)))
    model = _model(fused=fused)
    loss_sum, count = model(batch)
    assert count.item() == batch.num_loss_tokens
    mask = None if batch.doc_ids is not None else batch.mask
    logits = model.net(batch.input_ids, mask=mask, doc_ids=batch.doc_ids, positions=batch.positions)
    want = F.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(loss_sum, want, rtol=1e-5, atol=1e-4)
    # gradients too: the gathered rows carry them back into the stack
    loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model.net(batch.input_ids, mask=mask, doc_ids=batch.doc_ids, positions=batch.positions)
                    .transpose(1, 2), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum").backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        e_sum, e_count, correct = model(batch)
        logits = model.net(batch.input_ids, mask=mask, doc_ids=batch.doc_ids, positions=batch.positions)
    chosen = batch.labels != IGNORE_INDEX
    torch.testing.assert_close(e_sum, want.detach(), rtol=1e-5, atol=1e-4)
    assert correct.item() == (logits.argmax(-1)[chosen] == batch.labels[chosen]).sum().item()


def test_tensor_api_mean_over_labelled_positions():
    model = _model(fused=False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(3, TOK_VOCAB, (2, 20), generator=gen)
    labels = torch.full_like(x, -100)
    labels[:, ::4] = x[:, ::4]
    x = x.masked_fill(labels != -100, MASK_ID)
    logits = model(x)
    assert logits.shape == (2, 20, TOK_VOCAB + 1)
    torch.testing.assert_close(model(x, labels), F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100))


def test_vocab_parallel_correct_counts_argmax_hits():
    logits = torch.tensor([[[0.1, 2.0, 0.3, 9.0], [1.0, 0.5, 0.2, 9.0]]])
    target = torch.tensor([[1, 2]])
    # column 3 is vocabulary padding: never the argmax
    assert vocab_parallel_correct(logits, target, vocab_size=3).tolist() == [[True, False]]
    target = torch.tensor([[-100, 0]])
    assert vocab_parallel_correct(logits, target, vocab_size=3).tolist() == [[False, True]]


def test_packed_documents_do_not_see_each_other():
    """Change one document of a packed row: every other document's logits stay as they were."""
    model = _model().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(3, TOK_VOCAB, (2, 48), generator=gen)
    doc_ids = torch.tensor([[0] * 10 + [1] * 20 + [2] * 18, [0] * 30 + [1] * 18])
    positions = torch.cat([torch.arange(10), torch.arange(20), torch.arange(18),
                           torch.arange(30), torch.arange(18)]).view(2, 48)
    y = x.clone()
    y[0, 10:30] = torch.randint(3, TOK_VOCAB, (20,), generator=gen)  # row 0, document 1
    with torch.no_grad():
        a = model.net(x, doc_ids=doc_ids, positions=positions)
        b = model.net(y, doc_ids=doc_ids, positions=positions)
        alone = model.net(x[:1, 30:], positions=torch.arange(18)[None])  # document 2 by itself
    others = torch.ones(2, 48, dtype=torch.bool)
    others[0, 10:30] = False
    torch.testing.assert_close(a[others], b[others], rtol=0, atol=1e-6)
    assert (a[0, 10:30] - b[0, 10:30]).abs().max() > 1e-3  # the changed document did change
    torch.testing.assert_close(a[0, 30:], alone[0], rtol=1e-5, atol=1e-5)


def test_bidirectional_stack_is_required():
    from xft_dist import Decoder

    net = TransformerWrapper(num_tokens=30, max_seq_len=16, attn_layers=Decoder(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="needs a bidirectional stack"):
        MaskedLMWrapper(net)
    enc = TransformerWrapper(num_tokens=30, max_seq_len=16, attn_layers=Encoder(dim=16, depth=1, heads=2))
    MaskedLMWrapper(enc)


def test_batch_of_mlm_rows_counts_only_chosen(corpus):
    batch = next(iter(StreamingLoader(corpus, _loader_cfg("padded"), vocab_size=TOK_VOCAB + 1)))
    assert isinstance(batch, Batch) and batch.mode == "mlm"
    assert batch.num_loss_tokens == int((batch.labels != IGNORE_INDEX).sum())
    assert batch.num_real_tokens == int(batch.mask.sum()) < batch.num_tokens


def test_model_vocabulary_must_hold_the_mask_id(corpus):
    from xft_dist.data import DataError

    with pytest.raises(DataError, match="the masked LM needs its mask id after the tokenizer's 259"):
        StreamingLoader(corpus, _loader_cfg("packed"), vocab_size=TOK_VOCAB)
