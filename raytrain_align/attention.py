"""`attn_implementation: sdpa_varlen` — attention for packed (padding-free) batches without a dense mask.

TRL's padding-free collator flattens a packed batch into one row and passes the document boundaries as
`cu_seq_lens_q/k` and `max_length_q/k`. With `sdpa`, transformers turns the row's `position_ids` into a
dense block-diagonal causal mask of shape (1, 1, L, L) and PyTorch's SDPA then computes all L x L scores
(a masked kernel cannot skip blocks): at mbs 4 x 8192 tokens that is a 32768^2 mask and 4x the attention
work of the documents themselves. `sdpa_varlen` instead runs PyTorch's own variable-length flash kernel
(`torch.nn.attention.varlen.varlen_attn`) on exactly those documents — causal inside each document,
nothing across documents. Where that kernel is not available (CPU, older PyTorch, fp32) it runs SDPA with
`is_causal=True` once per document: the same function, slower. No mask is ever built (the name is not a
mask interface, so transformers' mask creation returns None).

`register()` makes the name known to transformers; `train.py` and the benchmark call it before loading.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # PyTorch < 2.9
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


_VARLEN, _VARLEN_PARAMS = _varlen_kernel()


def boundaries(kwargs: dict, length: int, device) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens int32 [N+1], max document length) of a flattened row: from the collator's
    `cu_seq_lens_q` if given, else from `position_ids` restarting at 0, else the whole row is one document."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu = cu.to(device=device, dtype=torch.int32)
        max_len = kwargs.get("max_length_q")
        return cu, int(max_len) if max_len is not None else int(cu.diff().max())
    pos = kwargs.get("position_ids")
    if pos is not None and pos.shape[-1] == length:
        starts = (pos.reshape(-1, length)[0] == 0).nonzero().flatten()
        if starts.numel() == 0 or int(starts[0]) != 0:
            starts = torch.cat([starts.new_zeros(1), starts])
        cu = torch.cat([starts, starts.new_tensor([length])]).to(device=device, dtype=torch.int32)
        return cu, int(cu.diff().max())
    return torch.tensor([0, length], dtype=torch.int32, device=device), length


def _per_document(q, k, v, cu, scale):
    """Reference path: (1, H, L, D) inputs, SDPA is_causal per document, concatenated along L."""
    outs = []
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e <= s:
            continue
        ks, vs = k[:, :, s:e], v[:, :, s:e]
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], ks, vs, is_causal=True, scale=scale))
    return torch.cat(outs, dim=2)


def _flash_varlen(q, k, v, cu, max_len, scale):
    """(1, H, L, D) -> (L, H, D) through torch's varlen flash kernel."""
    qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))  # (L, H, D)
    rep = qt.shape[1] // kt.shape[1]
    kw = {}
    if "enable_gqa" in _VARLEN_PARAMS:
        kw["enable_gqa"] = rep > 1
    elif rep > 1:
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    if "scale" in _VARLEN_PARAMS:
        kw["scale"] = scale
    elif scale is not None and abs(scale - qt.shape[-1] ** -0.5) > 1e-12:
        qt = qt * (scale * qt.shape[-1] ** 0.5)
    if "window_size" in _VARLEN_PARAMS:
        kw["window_size"] = (-1, 0)  # causal
    else:
        kw["is_causal"] = True
    return _VARLEN(qt.contiguous(), kt.contiguous(), vt.contiguous(), cu, cu, max_len, max_len, **kw)


def use_flash(q: torch.Tensor) -> bool:
    return _VARLEN is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def sdpa_varlen_attention_forward(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
                                  sliding_window=None, **kwargs):
    """transformers attention interface: query (B, Hq, L, D), key/value (B, Hkv, L, D) -> ((B, L, Hq, D), None)."""
    if sliding_window is not None:
        raise ValueError(f"attn_implementation '{NAME}' does not implement sliding-window layers; use sdpa")
    if dropout:
        raise ValueError(f"attn_implementation '{NAME}' does not implement attention dropout; use sdpa")
    b, _, length, _ = query.shape
    if b != 1:  # padded batch (no packing): plain causal SDPA per row; padding is only ever at the end
        if attention_mask is not None:
            raise ValueError(f"attn_implementation '{NAME}' needs padding-free packed batches (packing: true)")
        rep = query.shape[1] // key.shape[1]
        k, v = (key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)) if rep > 1 else (key, value)
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    cu, max_len = boundaries(kwargs, length, query.device)
    if use_flash(query):
        out = _flash_varlen(query, key, value, cu, max_len, scaling)  # (L, H, D)
        return out.unsqueeze(0), None
    return _per_document(query, key, value, cu, scaling).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `attn_implementation='sdpa_varlen'` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
