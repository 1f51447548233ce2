"""Packed (padding-free) attention keeps documents apart: the loss of a packed row equals the loss of its
documents run one by one, for every attention implementation the recipes may name.

What happens in transformers 5.x with `sdpa` (checked here): TRL's padding-free collator gives no
attention_mask, only position_ids restarting at 0 per document (plus cu_seq_lens); transformers'
`create_causal_mask` finds the documents from position_ids (`find_packed_sequence_indices`) and builds a
dense block-diagonal causal mask (1, 1, L, L) that SDPA applies. Correct, but L^2 in memory and work.
`sdpa_varlen` (raytrain_align.attention) runs per-document attention from cu_seq_lens with no mask.
CPU only (the flash kernel's check runs where CUDA is present); no Ray.
"""

from __future__ import annotations

import pytest
import torch

from raytrain_align import attention

DOCS = [9, 17, 5, 12]  # document lengths; two packed sequences: [9, 17] and [5, 12]


def _model(attn: str):
    from transformers import AutoModelForCausalLM, SmolLM3Config

    attention.register()
    cfg = SmolLM3Config(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
        no_rope_layer_interval=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def _docs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 101, (n,), generator=g) for n in DOCS]


def _unpacked_loss(model, docs) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            out = model(input_ids=d[None], labels=d[None])
            total += float(out.loss) * (len(d) - 1)
            count += len(d) - 1
    return total / count


def _packed_batch(docs):
    """Exactly what TRL's SFTTrainer feeds the model for two BFD-packed sequences (mbs 2, padding-free)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [
        {"input_ids": torch.cat(docs[:2]).tolist(), "seq_lengths": [len(docs[0]), len(docs[1])]},
        {"input_ids": torch.cat(docs[2:]).tolist(), "seq_lengths": [len(docs[2]), len(docs[3])]},
    ]
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)


@pytest.mark.parametrize("attn", ["sdpa", "eager", attention.NAME])
def test_packed_loss_equals_unpacked(attn):
    model = _model(attn)
    docs = _docs()
    batch = _packed_batch(docs)
    assert batch["input_ids"].shape == (1, sum(DOCS)) and "attention_mask" not in batch
    with torch.no_grad():
        packed = float(model(**batch, use_cache=False).loss)  # TRL's fused LM head passes use_cache=False
    unpacked = _unpacked_loss(model, docs)
    assert packed == pytest.approx(unpacked, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", attention.NAME])
def test_no_cross_contamination(attn):
    """Changing one document's tokens leaves the next document's logits unchanged; dropping the document
    boundaries (plain causal attention over the row) does change them, so the check can fail."""
    model = _model(attn)
    docs = _docs()
    other = [torch.randint(1, 101, (len(docs[0]),), generator=torch.Generator().manual_seed(7))] + docs[1:]
    a, b = _packed_batch(docs), _packed_batch(other)
    s, e = len(docs[0]), len(docs[0]) + len(docs[1])
    keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    with torch.no_grad():
        la = model(**{k: a[k] for k in keys}, use_cache=False).logits
        lb = model(**{k: b[k] for k in keys}, use_cache=False).logits
        leak = model(input_ids=b["input_ids"], use_cache=False).logits  # no boundaries at all: one causal row
    torch.testing.assert_close(la[0, s:e], lb[0, s:e], rtol=1e-5, atol=1e-5)
    assert (la[0, s:e] - leak[0, s:e]).abs().max() > 1e-3


def test_sdpa_packing_needs_use_cache_false():
    """A pitfall found here: with a KV cache (use_cache=True, the config default, and what the handbook's
    get_model leaves on without gradient checkpointing), transformers 5.x skips the packed-sequence detection
    and sdpa attends ACROSS documents. Training is safe because TRL's SFTTrainer calls the model with
    use_cache=False (its fused LM head forces it); sdpa_varlen is immune either way."""
    docs = _docs()
    batch = _packed_batch(docs)
    for attn, leaks in (("sdpa", True), (attention.NAME, False)):
        model = _model(attn)
        with torch.no_grad():
            cached = float(model(**batch, use_cache=True).loss)
        assert (abs(cached - _unpacked_loss(model, docs)) > 1e-3) == leaks, attn


def test_sdpa_builds_block_diagonal_mask_from_position_ids():
    """The mechanism behind sdpa's correctness above: a dense block-diagonal causal mask from position_ids."""
    from transformers.masking_utils import create_causal_mask

    model = _model("sdpa")
    batch = _packed_batch(_docs())
    emb = model.get_input_embeddings()(batch["input_ids"])
    mask = create_causal_mask(config=model.config, inputs_embeds=emb, attention_mask=None, past_key_values=None,
                              position_ids=batch["position_ids"])
    n = sum(DOCS)
    assert mask is not None and mask.shape == (1, 1, n, n) and mask.dtype == torch.bool
    cu = [0]
    for d in DOCS:
        cu.append(cu[-1] + d)
    want = torch.zeros(n, n, dtype=torch.bool)
    for s, e in zip(cu[:-1], cu[1:]):
        want[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0].cpu(), want)
    # sdpa_varlen needs no mask: transformers' mask creation returns None for it
    varlen = _model(attention.NAME)
    assert create_causal_mask(config=varlen.config, inputs_embeds=emb, attention_mask=None, past_key_values=None,
                              position_ids=batch["position_ids"]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash kernel needs CUDA")
def test_flash_varlen_matches_per_document_reference_cuda():
    """On a GPU: torch's varlen flash kernel (bf16) against SDPA per document in float32, forward and backward."""
    assert attention._VARLEN is not None, "torch.nn.attention.varlen is missing in this PyTorch"
    torch.manual_seed(0)
    lengths = [700, 3000, 1, 129, 4362]
    n, hq, hkv, d = sum(lengths), 16, 4, 128
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    out, _ = attention.sdpa_varlen_attention_forward(None, q, k, v, scaling=d ** -0.5, cu_seq_lens_q=cu,
                                                     max_length_q=max(lengths))
    (out[0] * go).sum().backward()
    got = [out[0].float(), q.grad.float(), k.grad.float(), v.grad.float()]
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = attention._per_document(q32, k32, v32, cu, d ** -0.5).transpose(1, 2)[0]
    (ref * go.float()).sum().backward()
    for a, r in zip(got, [ref, q32.grad, k32.grad, v32.grad]):
        rel = float((a - r).norm() / r.norm())
        assert torch.isfinite(a).all() and rel < 2e-2, rel
