"""IOPO: preference training on (input, output) quadruples, with SFT and DPO beside it for comparison.

    python iopo.py                                                  # the toy reproduction on a CPU (about 2 minutes)
    python iopo.py iopo --model toy --data runs/toy/seed0/data/iopo.jsonl --out runs/my_iopo --max-steps 50
    python iopo.py iopo --model ~/models/Qwen2-7B-Instruct --data trace_iopo.jsonl --out runs/q7 \
        --lora-rank 8 --dtype bfloat16 --grad-checkpointing --max-len 6000        # a real checkpoint on a GPU
    torchrun --nproc_per_node=8 iopo.py iopo ...                    # data parallel (add --fsdp to shard weights)

This file holds, bottom-up: the log-prob kernel that turns final hidden states into log p(token), the
three losses (SFT, DPO, IOPO) as pure functions of per-sequence log-probs, LoRA, the training step, then what
a real run needs around it (distributed training, reference log-probs, checkpoints: skip these on a first
reading), the training loop, and the toy reproduction of the paper's Table 3.

Papers followed:
- IOPO, Zhang et al. 2024, arXiv 2411.06208 (ACL 2025): the loss of Section 3 and the ablations of Table 4.
- DPO, Rafailov et al. 2023, arXiv 2305.18290: Eq. 7; label smoothing as in "conservative DPO".
- LoRA, Hu et al. 2021, arXiv 2106.09685.

What we simplify or leave out:
1. Log-probs are sums over response tokens (as the authors' code does); no length normalisation.
2. The two-term ablations are the MEAN of their two Bradley-Terry terms, so every loss starts at ln 2
   when the policy equals the reference (SPEC writes them as sums; the gradient is halved, nothing else).
3. The log-prob kernel only scores positions whose label is not `ignore_index`; the others cost nothing.
4. Reference log-probs come from the starting weights, computed once before training and cached on disk under
   a key of everything they depend on (reference_cache_key; --ref-on-the-fly scores each batch instead); the
   reference never changes during training, as in the paper.
5. Under --fsdp a checkpoint is gathered whole on rank 0 (one file set, the same as without FSDP, resumable
   with or without it), not written as shards by every process: simple, but rank 0 must hold it all on the CPU.
6. The toy reproduction trains a tiny model on 9 easy constraint families; it shows the machinery, not
   the paper's gains (see the README for what it measures).
"""

import argparse
import contextlib
import datetime
import gc
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data import (COLLATORS, IGNORE_INDEX, BatchSampler, DataError, EncodedDataset, ReadStats, RecordFile,
                  collate_packed, example_texts, holdout_split, packed_attention_mask, train_tokenizer)
from model import (INDEX_NAME, PRESETS, TOKENIZER_FILES, WEIGHTS_NAME, PackedRows, Transformer, load_model,
                   load_tokenizer, read_json, save_model, toy_config, write_atomic, write_json_atomic)

try:  # Triton is an optional extra: the kernel falls back to chunked PyTorch without it.
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# --- log-prob kernel
#
# Every loss in this file needs log p(label_t | context) for each scored token t. The obvious way builds
# logits = hidden @ W.T, a (tokens x V) matrix, and its log_softmax: for 4096 tokens and Qwen2's 151,936-word
# vocabulary that is 2.5 GB in float32, and autograd keeps two or three such tensors alive until backward.
# We never build it. The tokens are processed in chunks; for each chunk we compute the chunk's logits,
# reduce them to two numbers per token (the log-sum-exp and the target logit) and drop them. The
# gradient of log p(y) with respect to the logits is (onehot(y) - softmax), so:
#   - trainable head: the backward recomputes each chunk's logits from the saved hidden states and the
#     per-token log-sum-exp, turns them in place into g * (onehot - softmax) (g: each token's incoming
#     gradient), and multiplies back to get grad_hidden (chunk x D) and to accumulate grad_weight (V x D).
#     Cost: 4 matmuls instead of 3.
#   - frozen head (LoRA): no weight gradient is needed, so the forward pass already computes the
#     (tokens x D) factor (onehot - softmax) @ W, and the backward only scales it by the incoming gradient.
#     Cost: 2 matmuls, the same as the naive version.
# The Triton path does the same with cuBLAS for the matmuls and one Triton kernel per chunk for the
# row-wise work (online log-sum-exp + target gather in forward; (onehot - softmax) * g written into the
# logits buffer in place in backward), so that each row of the chunk is read once per pass, in its own dtype.


def token_logprobs_naive(hidden, weight, labels, ignore_index=-100):
    """Reference version: log p(label) at each position from the full logits; 0.0 where ignored.

    Memory is O(tokens x V) in forward and backward: fine for tests, not for training.
    """
    logits = (hidden @ weight.T).float()  # (..., V): exactly what the fused kernel never builds
    logps = torch.log_softmax(logits, dim=-1)  # (..., V)
    scored = labels != ignore_index
    safe_labels = labels.masked_fill(~scored, 0)
    picked = logps.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked.masked_fill(~scored, 0.0)


# Tokens per chunk. Every chunk streams the whole (V, D) weight through each matmul, so chunks must be tall
# enough for the matmuls to stay compute-bound; their (rows, V) float32 logits must stay small next to the
# naive version's (tokens, V) tensors. Tuned with `python bench.py --kernel` (CPU) and `--device cuda`.
_CHUNK_ROWS = {"cpu": 512, "cuda": 2048}
_CHUNK_BYTES = {"cpu": 512 * 2**20, "cuda": 1024 * 2**20}  # cap for very large vocabularies


def _chunk_rows(vocab_size, device):
    """Default rows per chunk on this device: _CHUNK_ROWS, fewer if the chunk's logits would pass _CHUNK_BYTES."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    return max(16, min(_CHUNK_ROWS[kind], _CHUNK_BYTES[kind] // (4 * vocab_size)))


def _chunk_lse_target(hidden, weight, labels):
    """One chunk, PyTorch: (exp(logits - row max) (c, V) float32, log-sum-exp (c,), target logit (c,),
    row sums (c,))."""
    logits = (hidden @ weight.T).float()  # (c, V)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    sum_exp = logits.sub_(row_max).exp_().sum(dim=1)  # logits now hold exp(logits - max)
    lse = row_max.squeeze(1) + sum_exp.log()
    return logits, lse, target, sum_exp


def _onehot_minus_softmax_(exp_logits, labels, scale, row_sums=None):
    """In place: exp(logits - shift) (c, V) -> scale * (onehot(labels) - softmax), the gradient of scale * log p(y).

    row_sums: the rows' sums when the shift was not the log-sum-exp (None: the rows already sum to 1).
    """
    exp_logits.mul_((-scale if row_sums is None else -scale / row_sums)[:, None])  # one pass over (c, V)
    exp_logits[torch.arange(len(labels), device=labels.device), labels] += scale
    return exp_logits


if triton is not None:

    @triton.jit
    def _lse_target_kernel(logits_ptr, stride, labels_ptr, lse_ptr, target_ptr, V, BLOCK_V: tl.constexpr):
        # One program per row: online log-sum-exp over vocabulary tiles, in float32, and the target logit.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        label = tl.load(labels_ptr + row)
        tl.store(lse_ptr + row, m + tl.log(s))
        tl.store(target_ptr + row, tl.load(base + label).to(tl.float32))

    @triton.jit
    def _softmax_grad_kernel(logits_ptr, stride, labels_ptr, lse_ptr, scale_ptr, V, BLOCK_V: tl.constexpr):
        # One program per row, in place: logits -> scale * (onehot(label) - exp(logits - lse)).
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        lse = tl.load(lse_ptr + row)
        scale = tl.load(scale_ptr + row)
        label = tl.load(labels_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = scale * (tl.where(cols == label, 1.0, 0.0) - tl.exp(x - lse))
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


_TRITON_BLOCK_V = 2048


def _triton_lse_target(logits, labels):
    lse = torch.empty(len(labels), dtype=torch.float32, device=logits.device)
    target = torch.empty_like(lse)
    _lse_target_kernel[(len(labels),)](logits, logits.stride(0), labels, lse, target, logits.shape[1],
                                       BLOCK_V=_TRITON_BLOCK_V)
    return lse, target


def _triton_softmax_grad_(logits, lse, labels, scale):
    _softmax_grad_kernel[(len(labels),)](logits, logits.stride(0), labels, lse, scale.float().contiguous(),
                                         logits.shape[1], BLOCK_V=_TRITON_BLOCK_V)
    return logits


def _forward_chunk(hidden, weight, labels, use_triton, want_factor):
    """One chunk: (log p(y) (c,), lse (c,), and if want_factor the (c, D) factor (onehot - softmax) @ W)."""
    ones = torch.ones(len(labels), dtype=torch.float32, device=hidden.device)
    if use_triton:
        logits = hidden @ weight.T  # (c, V) in the input dtype, straight from cuBLAS
        lse, target = _triton_lse_target(logits, labels)
        factor = _triton_softmax_grad_(logits, lse, labels, ones) @ weight if want_factor else None
        return target - lse, lse, factor
    exp_shifted, lse, target, sum_exp = _chunk_lse_target(hidden, weight, labels)
    factor = None
    if want_factor:
        grad_logits = _onehot_minus_softmax_(exp_shifted, labels, ones, row_sums=sum_exp).to(hidden.dtype)
        factor = grad_logits @ weight  # (c, D)
    return target - lse, lse, factor


class _FusedLogProbs(torch.autograd.Function):
    """log p(labels) for rows of `hidden` (all scored), chunked; see the banner above for the idea."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows, use_triton, frozen_head):
        logps = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        factor = torch.empty_like(hidden) if frozen_head else None  # (N, D): the whole backward of a frozen head
        for s in range(0, len(labels), chunk_rows):
            e = s + chunk_rows
            logps[s:e], lse[s:e], f = _forward_chunk(hidden[s:e], weight, labels[s:e], use_triton, frozen_head)
            if frozen_head:
                factor[s:e] = f
        ctx.chunk_rows, ctx.use_triton, ctx.frozen_head = chunk_rows, use_triton, frozen_head
        if frozen_head:
            ctx.save_for_backward(factor)
        else:
            ctx.save_for_backward(hidden, weight, labels, lse)
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):  # grad_logps: (N,)
        if ctx.frozen_head:
            (factor,) = ctx.saved_tensors
            return (grad_logps[:, None] * factor).to(factor.dtype), None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None  # (V, D)
        for s in range(0, len(labels), ctx.chunk_rows):
            e = s + ctx.chunk_rows
            h, y, g = hidden[s:e], labels[s:e], grad_logps[s:e].float()
            if ctx.use_triton:
                grad_logits = _triton_softmax_grad_(h @ weight.T, lse[s:e], y, g)  # (c, V), input dtype
            else:
                probs = (h @ weight.T).float().sub_(lse[s:e, None]).exp_()  # (c, V) softmax, recomputed
                grad_logits = _onehot_minus_softmax_(probs, y, g).to(h.dtype)
                del probs  # (a bfloat16 run holds both for a moment; float32 ones share the buffer)
            if want_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[s:e])  # (c, D)
            if want_weight:
                # In the weight's dtype, like the naive version's gradient: the matmul adds into the buffer
                # with float32 accumulation, so bfloat16 rounds once per chunk and no (V, D) float32 copy is kept.
                grad_weight.addmm_(grad_logits.T, h)  # (V, D)
            del grad_logits  # free this chunk's (c, V) buffer before the next one is built
        return grad_hidden, grad_weight, None, None, None, None


def _triton_usable(device):
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _scored_rows(flat_labels, ignore_index, vocab_size, who):
    """Indices of the scored labels (only these rows cost anything), after checking that their ids lie in
    [0, vocab_size). Both steps read the labels' values: on a GPU the CPU waits here."""
    scored = (flat_labels != ignore_index).nonzero().squeeze(1)
    y = flat_labels[scored]
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= vocab_size):
        raise ValueError(f"{who}: labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                         f"found {int(y.min())}..{int(y.max())}")
    return scored


def token_logprobs(hidden, weight, labels, ignore_index=-100, impl="auto", chunk_size=None, scored_index=None):
    """log p(labels[...] | context) for every position, as float32 of labels' shape; 0.0 where ignored.

    hidden (..., D): final hidden states (after the last norm). weight (V, D): the lm_head weight, possibly
    the tied input embedding (it then receives this gradient plus the embedding's). labels (...): int64
    target ids, already shifted, `ignore_index` where nothing is scored. impl: "naive" (the reference
    above), "torch" (chunked PyTorch), "triton" (CUDA, or the CPU with TRITON_INTERPRET=1) or "auto"
    (triton on CUDA when importable, else torch). chunk_size: tokens per chunk (default: 512 on the CPU,
    2048 on a GPU, fewer where a chunk's float32 logits would pass 512 MB / 1 GB). The log-sum-exp is
    accumulated in float32 for every input dtype. scored_index (n,): the flat positions where labels is not
    ignore_index, if the caller already knows them (scored_positions, on the CPU): finding them here, and
    checking the ids' range, would make the CPU wait for the GPU; with it the caller has checked the range.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)} must be labels {tuple(labels.shape)} + (D,)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"token_logprobs: weight {tuple(weight.shape)} must be (V, D) with D = {hidden.shape[-1]}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_logprobs: labels must hold integer token ids, got dtype {labels.dtype}")
    if impl not in ("auto", "naive", "torch", "triton"):
        raise ValueError(f"token_logprobs: impl must be auto, naive, torch or triton, got {impl!r}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"token_logprobs: hidden is {hidden.dtype} but weight is {weight.dtype}")
    labels = labels.long()
    if impl == "auto":
        impl = "triton" if hidden.device.type == "cuda" and triton is not None else "torch"
    if impl == "triton" and not _triton_usable(hidden.device):
        raise ValueError("token_logprobs: impl='triton' needs triton and CUDA tensors "
                         f"(or TRITON_INTERPRET=1 on the CPU); got {hidden.device}, triton "
                         f"{'missing' if triton is None else 'installed'}")
    if impl == "naive":
        return token_logprobs_naive(hidden, weight, labels, ignore_index)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    flat_labels = labels.reshape(-1)  # (N,)
    if scored_index is not None:
        scored = scored_index.to(flat_labels.device)
    else:
        scored = _scored_rows(flat_labels, ignore_index, weight.shape[0], "token_logprobs")
    y = flat_labels[scored]
    h = flat_hidden if len(scored) == len(flat_labels) else flat_hidden[scored]  # (n, D)
    if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
        raise ValueError(f"token_logprobs: chunk_size must be a positive integer or None, got {chunk_size!r}")
    rows = chunk_size or _chunk_rows(weight.shape[0], hidden.device)
    use_triton = impl == "triton"

    with torch.autocast(hidden.device.type, enabled=False):  # the inputs' dtype decides, as in the backward
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            frozen_head = not weight.requires_grad
            logps = _FusedLogProbs.apply(h.contiguous(), weight, y, rows, use_triton, frozen_head)
        elif len(y):  # evaluation, reference model: forward only, nothing saved
            logps = torch.cat([_forward_chunk(h[s:s + rows], weight, y[s:s + rows], use_triton, False)[0]
                               for s in range(0, len(y), rows)])
        else:
            logps = h.new_zeros(0, dtype=torch.float32)
    # Filled in place so that the result is not a view: FSDP2 warns when a module returns a view (an in-place
    # op on one would bypass its backward hook), and the Scorer returns this tensor
    out = logps.new_zeros(labels.shape)
    out.view(-1).index_copy_(0, scored, logps)
    return out


# --- losses
#
# Pure functions of per-sequence log-probs L(y|x) (sums over response tokens, SPEC §1), batch means.
# r(x, y) = L_policy(y|x) - L_ref(y|x). Metrics are detached batch means: float tensors, never .item(),
# so computing them costs no host-device synchronisation.


def sft_loss(token_logps, mask, n_tokens=None):
    """Mean negative log-likelihood over response tokens: -sum_t mask_t log p_t / sum_t mask_t, and no metrics.
    n_tokens, when given, is the denominator instead. Under torchrun, training passes the global micro-batch's
    token count divided by the number of processes, because DDP then averages the processes' gradients: the
    result is the mean over all of the micro-batch's tokens. A denominator of 1 gives the sum."""
    # a bool mask needs no value check (reading the values would make the CPU wait for the GPU)
    if mask.shape != token_logps.shape or (mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all())):
        raise ValueError(f"sft_loss: mask must be 0/1 (or bool) of token_logps' shape {list(token_logps.shape)}, "
                         f"got shape {list(mask.shape)}")
    mask = mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens), {}


def _check_pairs(who, beta, label_smoothing, **sums):
    """The preference losses take (B,) sums, one per example, all the same length: a (B, 1) reference would
    broadcast to (B, B) and give a wrong number without an error. beta > 0; label smoothing in [0, 0.5)."""
    if not beta > 0 or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"{who}: beta must be > 0 and label_smoothing in [0, 0.5), got {beta} and {label_smoothing}")
    shapes = {name: tuple(t.shape) for name, t in sums.items() if t is not None}
    distinct = set(shapes.values())
    if len(distinct) != 1 or len(distinct.pop()) != 1:  # one shape, and that shape is (B,)
        raise ValueError(f"{who}: every log-prob sum must be a 1-D tensor of the batch's length, got {shapes}")


def _bradley_terry(z, label_smoothing):
    """-log sigmoid(z); with label smoothing eps: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta=0.1, label_smoothing=0.0):
    """DPO (arXiv 2305.18290, Eq. 7) on pairs (x, y_w, y_l):

        loss = -log sigmoid( beta * [r(x, y_w) - r(x, y_l)] )
    """
    _check_pairs("dpo_loss", beta, label_smoothing, logp_w=logp_w, logp_l=logp_l, ref_logp_w=ref_logp_w,
                 ref_logp_l=ref_logp_l)
    r_w = logp_w - ref_logp_w  # (B,)
    r_l = logp_l - ref_logp_l  # (B,)
    z = beta * (r_w - r_l)
    loss = _bradley_terry(z, label_smoothing).mean()
    metrics = {
        "rewards/chosen": (beta * r_w).mean(),
        "rewards/rejected": (beta * r_l).mean(),
        "margins": z.mean(),
        "accuracy": (r_w > r_l).float().mean(),
        "logps/chosen": logp_w.mean(),
        "logps/rejected": logp_l.mean(),
    }
    return loss, {k: v.detach().float() for k, v in metrics.items()}


IOPO_VARIANTS = ("full", "no_input_pref", "no_output_pref", "three_seq")


def iopo_loss(logp_y1_x1, logp_y2_x1, logp_y2_x2, logp_y1_x2, ref_logp_y1_x1, ref_logp_y2_x1, ref_logp_y2_x2,
              ref_logp_y1_x2, beta=0.1, label_smoothing=0.0, variant="full"):
    """IOPO (arXiv 2411.06208, Section 3) on quadruples (x1, y1, x2, y2); rAB = r(xA, yB), as in SPEC §1.

        full:            -log sigmoid( beta * [ (r11 - r12) + (r22 - r21)      output preference (DPO's terms)
                                              + (r11 - r21) + (r22 - r12) ] / 2 )   input preference
                        = -log sigmoid( beta * (r11 + r22 - r12 - r21) )
        no_input_pref:   mean of -log sigmoid(beta (r11 - r12)) and -log sigmoid(beta (r22 - r21))
        no_output_pref:  mean of -log sigmoid(beta (r11 - r21)) and -log sigmoid(beta (r22 - r12))
        three_seq:       -log sigmoid( beta * (2 r11 - r12 - r21) )       (no (x2, y2): its args may be None)

    where r11 = r(x1, y1), r12 = r(x1, y2), r22 = r(x2, y2), r21 = r(x2, y1). The paper groups "full" as
    -log sigmoid((P1 + P2) / 2), P1 = beta (2 r11 - r12 - r21), P2 = beta (2 r22 - r21 - r12): the same number.
    The ablations (Table 4) average their two terms, so every variant is ln 2 when policy == reference;
    three_seq is the appendix's 3-sequence variant.
    """
    if variant not in IOPO_VARIANTS:
        raise ValueError(f"iopo_loss: variant must be one of {IOPO_VARIANTS}, got {variant!r}")
    four = variant != "three_seq"  # three_seq has no (x2, y2)
    _check_pairs("iopo_loss", beta, label_smoothing, logp_y1_x1=logp_y1_x1, logp_y2_x1=logp_y2_x1,
                 logp_y2_x2=logp_y2_x2 if four else None, logp_y1_x2=logp_y1_x2, ref_logp_y1_x1=ref_logp_y1_x1,
                 ref_logp_y2_x1=ref_logp_y2_x1, ref_logp_y2_x2=ref_logp_y2_x2 if four else None,
                 ref_logp_y1_x2=ref_logp_y1_x2)
    r11 = logp_y1_x1 - ref_logp_y1_x1  # (B,) x1 with its own response
    r12 = logp_y2_x1 - ref_logp_y2_x1  # (B,) x1 with y2, which breaks x1's constraints
    r21 = logp_y1_x2 - ref_logp_y1_x2  # (B,) x2 with y1, which breaks x2's constraints
    r22 = None if variant == "three_seq" else logp_y2_x2 - ref_logp_y2_x2  # (B,) x2 with its own response

    if variant == "full":
        output_pref = (r11 - r12) + (r22 - r21)  # same input, y_match vs y_other: DPO on both prompts
        input_pref = (r11 - r21) + (r22 - r12)  # same response, x_match vs x_other: what IOPO adds
        z = beta * (output_pref + input_pref) / 2
        # The authors' code: 0.5 * ((2 r11 - r12 - r21) + (2 r22 - r21 - r12)), the same sum regrouped.
        losses = _bradley_terry(z, label_smoothing)
    elif variant == "no_input_pref":
        losses = (_bradley_terry(beta * (r11 - r12), label_smoothing)
                  + _bradley_terry(beta * (r22 - r21), label_smoothing)) / 2
    elif variant == "no_output_pref":
        losses = (_bradley_terry(beta * (r11 - r21), label_smoothing)
                  + _bradley_terry(beta * (r22 - r12), label_smoothing)) / 2
    else:  # three_seq
        losses = _bradley_terry(beta * (2 * r11 - r12 - r21), label_smoothing)
    return losses.mean(), _iopo_metrics(beta, r11, r12, r22, r21, logp_y1_x1, logp_y2_x1, logp_y2_x2, logp_y1_x2)


def _iopo_metrics(beta, r11, r12, r22, r21, logp_y1_x1, logp_y2_x1, logp_y2_x2, logp_y1_x2):
    """Detached batch means: rewards beta*r, margins, output / input preference accuracies, policy log-probs."""
    m = {
        "rewards/y1_x1": beta * r11, "rewards/y2_x1": beta * r12, "rewards/y1_x2": beta * r21,
        "margins/output_x1": beta * (r11 - r12),  # x1: y1 over y2
        "margins/input_y1": beta * (r11 - r21),  # y1: x1 over x2
        "logps/y1_x1": logp_y1_x1, "logps/y2_x1": logp_y2_x1, "logps/y1_x2": logp_y1_x2,
    }
    if r22 is None:  # three_seq: only the comparisons that involve r11
        m["accuracy/output"] = (r11 > r12).float()
        m["accuracy/input"] = (r11 > r21).float()
    else:
        m.update({
            "rewards/y2_x2": beta * r22, "logps/y2_x2": logp_y2_x2,
            "margins/output_x2": beta * (r22 - r21),  # x2: y2 over y1
            "margins/input_y2": beta * (r22 - r12),  # y2: x2 over x1
            "accuracy/output": ((r11 > r12).float() + (r22 > r21).float()) / 2,
            "accuracy/input": ((r11 > r21).float() + (r22 > r12).float()) / 2,
        })
    return {k: v.detach().float().mean() for k, v in m.items()}


def ftx_term(logp_y1_x1, n_y1, logp_y2_x2=None, n_y2=None):
    """The authors' optional SFT term, added by the trainer as `loss + ftx * ftx_term(...)` (ftx = 0 in the paper):

        IOPO: -( L(y1|x1) / |y1| + L(y2|x2) / |y2| )        DPO (only the first pair given): -L(y_w|x) / |y_w|

    averaged over the batch; |y| is the number of scored response tokens (`sequence_sums`' second output).
    """
    given = [t for t in (logp_y1_x1, n_y1, logp_y2_x2, n_y2) if t is not None]
    if (logp_y2_x2 is None) != (n_y2 is None) or len({tuple(t.shape) for t in given}) != 1 or given[0].dim() != 1:
        raise ValueError(f"ftx_term: log-prob sums and token counts must be 1-D of one length, in pairs; got shapes "
                         f"{[None if t is None else list(t.shape) for t in (logp_y1_x1, n_y1, logp_y2_x2, n_y2)]}")
    term = -logp_y1_x1 / n_y1.clamp(min=1)
    if logp_y2_x2 is not None:
        term = term - logp_y2_x2 / n_y2.clamp(min=1)
    return term.mean()


# --- LoRA (arXiv 2106.09685), by hand
#
# A LoRA layer is the frozen linear layer plus a trainable rank-r update: y = x W^T + b + (alpha/r) x A^T B^T,
# with B initialised to zero so training starts exactly at the base model. The class below IS an nn.Linear
# (same `weight` and `bias` names), so state-dict keys keep their Hugging Face names and the two new
# tensors sit beside them (`q_proj.lora_A`, `q_proj.lora_B`). Switching the update off gives back the base
# model, which is all the reference model needs: no second copy of the weights.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # "all linear"


class LoRALinear(nn.Linear):
    def __init__(self, base, rank, alpha, dropout):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and draw a weight that we take from `base`
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        a = torch.empty(rank, self.in_features)  # drawn on the CPU: the same adapters whatever the device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initialises its own weight
        self.lora_A = nn.Parameter(a.to(device))  # (r, in), float32
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (out, r)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.adapter_enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return y
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (self.scale * update).to(y.dtype)

    def merged_weight(self):
        return (self.weight.float() + self.scale * self.lora_B @ self.lora_A).to(self.weight.dtype)


def add_lora(model, rank, alpha, dropout, targets=LORA_TARGETS):
    """Replace the target linear layers by LoRALinear in place; freeze everything else. Returns the LoRA modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not lora:
        raise ValueError(f"no linear layer named one of {targets} found for LoRA")
    return lora


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base model: every LoRA update switched off inside the block (the reference model)."""
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in lora:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m in lora:
            m.adapter_enabled = True


def merged_copy(model):
    """A plain Transformer holding the LoRA-merged weights on the CPU (what save_model writes)."""
    state = {}
    for name, t in model.state_dict().items():
        if ".lora_" not in name:
            state[name] = t.detach().to("cpu")
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{name}.weight"] = m.merged_weight().detach().to("cpu")
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    return plain


# --- training
#
# One loop serves the three methods; they differ only in how a batch is laid out (data.py's collators) and
# in the loss applied to the per-sequence log-probs:
#   sft   B rows                                  sft_loss over response tokens
#   dpo   2B rows [(x, y_w); (x, y_l)]            dpo_loss
#   iopo  4B rows [(x1,y1); (x1,y2); (x2,y2); (x2,y1)]   iopo_loss
# The reference log-probs of every example are computed once before training (no_grad, reference weights)
# and cached on disk; training then runs a single network (--ref-on-the-fly instead scores each batch with the
# reference as it goes: LoRA's adapters switched off, or a frozen copy of the starting weights).


@dataclass
class TrainConfig:
    method: str = "iopo"  # sft | dpo | iopo
    model: str = "toy"  # Hugging Face checkpoint folder, or "toy": a from-scratch model and tokenizer trained on --data
    data: str = ""  # training file (required): JSONL (or a JSON array) in the method's format, see data.py
    out: str = "runs/train"  # output folder (metrics.jsonl, checkpoint-N/, final/, ...); reference cache: ../ref_cache/
    lr: float = 0.0  # peak learning rate; 0 means the paper's: 1e-4 for SFT, 5e-6 for DPO and IOPO
    epochs: float = 3.0  # passes over the data (the paper: 3), rounded up to whole steps; ignored when --max-steps > 0
    max_steps: int = 0  # optimizer steps to run; 0 means derive them from --epochs
    batch_size: int = 1  # instructions per micro-batch over all processes (IOPO: 4 sequences each, DPO: 2, SFT: 1)
    grad_accum: int = 8  # micro-batches per optimizer step (the released config: 1 x 8)
    warmup_ratio: float = 0.1  # share of the steps spent warming up linearly, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW weight decay on matrices (never on norms and biases)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    beta: float = 0.1  # DPO / IOPO temperature on the log-ratios
    label_smoothing: float = 0.0  # conservative DPO / IOPO: assumed share of flipped preferences
    ftx: float = 0.0  # weight of the optional SFT term on the matched pairs (authors' code; 0 in the paper)
    variant: str = "full"  # IOPO loss: full | no_input_pref | no_output_pref | three_seq
    max_len: int = 1024  # tokens per sequence; longer examples are cut like the authors' code (data.py)
    group_by_length: bool = False  # batch examples of similar length together (less padding; order less random)
    seed: int = 0  # seeds the model init (toy), LoRA's A matrices, the held-out draw, the data order, dropout
    dtype: str = "float32"  # float32, or bfloat16: autocast (LoRA: the frozen base, so the saved model, in bfloat16)
    device: str = "auto"  # cpu | cuda | auto (cuda when available)
    grad_checkpointing: bool = False  # recompute each block in backward: activations of one block instead of all
    compile: bool = False  # torch.compile each block (first steps are slow while it compiles; GPU mainly)
    pack: bool = False  # DPO / IOPO: one row [x, y_a, y_b] per prompt instead of two rows that repeat x
    packed_attention: str = "auto"  # with --pack: mask (T x T) | rows (two causal passes) | auto (GPU rows, CPU mask)
    # (rows: model.PackedRows; on a GPU at 2k tokens rows were faster, on the CPU at toy lengths the mask: README)
    fsdp: bool = False  # under torchrun, shard weights, gradients and optimizer state over the processes (FSDP2)
    dist_timeout: float = 60.0  # under torchrun, minutes a process waits for the others before giving up
    # (rank 0 alone writes checkpoints; a gathered FSDP one of 7B full fine-tuning is ~84 GB: NCCL's default is 10)
    lora_rank: int = 0  # LoRA rank on all linear layers of the blocks; 0 trains every weight (full fine-tuning)
    lora_alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / rank) B A
    lora_dropout: float = 0.0  # dropout on the LoRA input
    ref_on_the_fly: bool = False  # compute reference log-probs at every step instead of once up front
    ref_batch_size: int = 8  # instructions per batch of the reference pass before training (or over the held-out set)
    eval_every: int = 0  # evaluate the loss on the --eval-size held-out examples every N steps (0: never)
    eval_size: int = 0  # examples held out from --data for that evaluation (drawn with --seed)
    save_every: int = 0  # write a resumable checkpoint every N steps (0: only the final model)
    keep_checkpoints: int = 0  # keep the newest N checkpoints; older ones go once a new one is complete (0: all)
    resume: str = ""  # checkpoint (or output folder: its latest) to continue with its saved settings (see below)
    skip_bad: bool = False  # skip malformed data lines (and report how many) instead of stopping
    overwrite: bool = False  # start over in an --out that holds an earlier run (its metrics, final/ and checkpoints go)
    toy_preset: str = "toy"  # model.PRESETS size for --model toy
    toy_vocab: int = 2048  # tokenizer vocabulary for --model toy
    log_every: int = 1  # print to the progress bar every N steps (metrics.jsonl gets every step)


def lr_at(step, total, peak, warmup_ratio):
    """Linear warmup over the first warmup_ratio * total steps, then cosine decay to zero (step is 0-based)."""
    warmup = int(math.ceil(warmup_ratio * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class Scorer(nn.Module):
    """The network plus the log-prob kernel: forward returns log p(label) per position, (R, T-1).

    Wrapping both in one module lets DistributedDataParallel see the head's gradient as part of forward.
    Packed rows (data.collate_packed: segment_ids, position_ids, labels_b) return (2, R, T-1): the log-probs
    under `labels` (y_a) and under `labels_b` (y_b), both read from the same hidden states.

    Rows must be right-padded, as data.py's collators make them (scored_positions checks it): padding then
    comes after every real token, causal attention alone keeps it unseen, and the model runs without a
    padding mask (an explicit mask would take SDPA off its flash kernel).

    packed_attention: how y_b is kept from seeing y_a in a packed row: "mask", an explicit (R, 1, T, T) mask
    (one attention call, no causal shortcut, and on a GPU no flash kernel), or "rows", two causal calls
    (model.PackedRows) that skip the masked half. Which is faster depends on the lengths and the kernels
    (README, `bench.py --attention`): train() picks rows on a GPU and mask on the CPU unless told."""

    def __init__(self, model, packed_attention="mask"):
        super().__init__()
        if packed_attention not in ("mask", "rows"):
            raise ValueError(f"packed_attention must be mask or rows, got {packed_attention!r}")
        self.model = model
        self.packed_attention = packed_attention

    def forward(self, input_ids, attention_mask, labels, labels_b=None, position_ids=None, segment_ids=None,
                a_index=None, b_index=None, b_src=None, b_dst=None, scored_index=None):
        # The batch's attention_mask (1 = token, 0 = padding) is not passed on: rows are right-padded, so
        # causality alone hides the padding from every real token (see above)
        if segment_ids is not None and self.packed_attention == "rows":  # packed [x, y_a, y_b]: two causal passes
            mask = PackedRows(a_index, b_index, b_src, b_dst)
        elif segment_ids is not None:  # the same rule as one (R, 1, T, T) mask: y_b never sees y_a
            mask = packed_attention_mask(segment_ids)
        else:
            mask = None
        hidden = self.model(input_ids, attention_mask=mask, position_ids=position_ids)  # (R, T, D)
        weight = self.model.lm_head.weight
        if torch.is_autocast_enabled(hidden.device.type):
            # The head is a matmul like any Linear, so under autocast it runs in the autocast dtype (bfloat16
            # copies of the float32 tensors, as autocast makes for every Linear; the gradient flows back through
            # the cast). Without this it would follow the final norm's float32 output and run the step's largest
            # matmul in float32 (the README's H100 profile).
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        elif weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
        if labels_b is None:  # (R, T-1): token t scored from t-1
            return token_logprobs(hidden[:, :-1], weight, labels[:, 1:], scored_index=scored_index)
        # Both answers in one kernel call: the hidden states twice (a small (2, R, T, D) copy), two label sets
        both = torch.stack([labels[:, 1:], labels_b[:, 1:]])  # (2, R, T-1)
        return token_logprobs(hidden[:, :-1].expand(2, *hidden[:, :-1].shape), weight, both,
                              scored_index=scored_index)  # (2, R, T-1)


def scored_positions(batch, vocab_size):
    """The scored_index that Scorer passes to the kernel for `batch` (still on the CPU): flat positions of the
    scored labels in its (R, T-1) or, for packed rows, (2, R, T-1) layout. Also checks here, where reading
    the batch costs nothing, what the Scorer relies on: rows are right-padded and label ids are in range."""
    mask = batch["attention_mask"]
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("batch has padding before a token; the Scorer needs right-padded rows (data.py's collators)")
    labels = batch["labels"][:, 1:]
    if "labels_b" in batch:
        labels = torch.stack([labels, batch["labels_b"][:, 1:]])
    return _scored_rows(labels.reshape(-1), IGNORE_INDEX, vocab_size, "batch")


SEQS_PER_EXAMPLE = {"sft": 1, "dpo": 2, "iopo": 4}


def policy_rows(cfg, batch):
    """The plain rows the policy scores: all of them, except the (x2, y2) block for IOPO's three-sequence
    variant, which its loss does not use. (Packed rows compute (x2, y2) with (x2, y1) anyway: method_loss
    drops it. Reference tables keep a column for every sequence: micro_batch's every_sequence.)"""
    if cfg.method == "iopo" and cfg.variant == "three_seq":
        keep = [0, 1, 3]  # (x1,y1), (x1,y2), (x2,y1)
        return {k: torch.cat([v.chunk(4)[i] for i in keep]) for k, v in batch.items()}
    return batch


def micro_batch(cfg, examples, pad_id, vocab_size, every_sequence=False):
    """One micro-batch on the CPU, as the step reads it: packed rows (data.collate_packed) with cfg.pack, else
    the collator's rows, less the unused (x2, y2) block for three_seq unless every_sequence (the reference
    tables have a column for every sequence); plus the kernel's scored_index, found here so the step never waits."""
    if cfg.pack:
        batch = collate_packed(examples, cfg.method, pad_id)
    else:
        batch = COLLATORS[cfg.method](examples, pad_id)
        batch = batch if every_sequence else policy_rows(cfg, batch)
    batch["scored_index"] = scored_positions(batch, vocab_size)
    return batch


def sequence_sums(cfg, token_logps, labels, labels_b=None):
    """(S,) log-prob sums and (S,) scored-token counts of the batch's sequences, in the collators' order
    (sequence j of every example in block j; data.IOPO_ORDER for IOPO, less the (x2, y2) block in three_seq's
    plain rows: policy_rows). token_logps is (R, T-1) for plain rows; for packed ones (labels_b given) it is
    (2, R, T-1), the y_a and y_b log-probs of each row."""
    logps = token_logps.sum(-1)  # (R,) L(y|x); packed: (2, R)
    n = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    if labels_b is None:
        return logps, n
    n = torch.stack([n, (labels_b[:, 1:] != IGNORE_INDEX).sum(-1)])  # (2, R)
    if cfg.method == "dpo":  # rows [x, y_w, y_l]: the y_w sums, then the y_l sums
        return logps.flatten(), n.flatten()
    half = logps.shape[1] // 2  # rows [x1, y1, y2] (first half), then [x2, y2, y1]
    return tuple(torch.cat([t[0, :half], t[1, :half], t[0, half:], t[1, half:]]) for t in (logps, n))


def method_loss(cfg, token_logps, labels, ref, n_tokens_total=None, labels_b=None):
    """Loss and detached metrics of one micro-batch. token_logps (R, T-1); ref (B, k) reference sums or None,
    its columns in the collators' order (data.IOPO_ORDER for IOPO: all four, even for three_seq).
    Packed rows (labels_b given): token_logps (2, R, T-1), the y_a and y_b log-probs of each row."""
    scored = labels[:, 1:] != IGNORE_INDEX  # (R, T-1)
    if cfg.method == "sft":
        return sft_loss(token_logps, scored, n_tokens_total)
    logps, n = sequence_sums(cfg, token_logps, labels, labels_b)
    if labels_b is not None and cfg.method == "iopo" and cfg.variant == "three_seq":
        # a packed row computes (x2, y2) along with (x2, y1); three_seq does not use it (plain rows: policy_rows)
        logps, n = (torch.cat([c for i, c in enumerate(t.chunk(4)) if i != 2]) for t in (logps, n))
    if cfg.method == "dpo":
        logp_w, logp_l = logps.chunk(2)
        loss, metrics = dpo_loss(logp_w, logp_l, ref[:, 0], ref[:, 1], cfg.beta, cfg.label_smoothing)
        if cfg.ftx:
            loss = loss + cfg.ftx * ftx_term(logp_w, n.chunk(2)[0])
        return loss, metrics
    if cfg.variant == "three_seq":
        logp_y1_x1, logp_y2_x1, logp_y1_x2 = logps.chunk(3)
        logp_y2_x2 = None
    else:
        logp_y1_x1, logp_y2_x1, logp_y2_x2, logp_y1_x2 = logps.chunk(4)  # data.IOPO_ORDER
    loss, metrics = iopo_loss(logp_y1_x1, logp_y2_x1, logp_y2_x2, logp_y1_x2, *ref.unbind(1),
                              beta=cfg.beta, label_smoothing=cfg.label_smoothing, variant=cfg.variant)
    if cfg.ftx:
        n_y1, n_y2 = n[:len(logp_y1_x1)], None if logp_y2_x2 is None else n.chunk(4)[2]
        loss = loss + cfg.ftx * ftx_term(logp_y1_x1, n_y1, logp_y2_x2, n_y2)
    return loss, metrics


def policy_loss(cfg, net, batch, ref, autocast, n_tokens_total=None):
    """The forward half of a training step: log-probs of a device micro-batch (micro_batch's layout) under
    autocast, then method_loss in float32. bench.py --train times this same function."""
    with autocast():
        token_logps = net(**batch)
    return method_loss(cfg, token_logps.float(), batch["labels"], ref, n_tokens_total, batch.get("labels_b"))


def make_optimizer(trainable, cfg):
    """AdamW; matrices decay by cfg.weight_decay, 1-D weights (norms, biases) do not."""
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))


def to_device(batch, device, pin=lambda t: t):
    return {k: pin(v).to(device, non_blocking=True) for k, v in batch.items()}


# --- distributed training
#
# torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them we are one process.


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def setup_distributed(device, timeout_minutes=60.0):
    if "RANK" not in os.environ or dist.is_initialized():
        return rank_and_world(), device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return (dist.get_rank(), dist.get_world_size()), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


# --- reference log-probs
#
# Computed once before training from the starting weights (SPEC §1: the reference never changes), cached
# on disk under a key of everything they depend on.


def reference_sums(cfg, scorer, batch):
    """(B, k) float32 reference log-prob sums of a device micro-batch of B examples made by
    micro_batch(..., every_sequence=True), packed or not. Call under no_grad and autocast."""
    token_logps = scorer(**batch).float()
    sums, _ = sequence_sums(cfg, token_logps, batch["labels"], batch.get("labels_b"))
    return sums.view(SEQS_PER_EXAMPLE[cfg.method], -1).T


@torch.no_grad()
def reference_logps(scorer, dataset, cfg, device, autocast, rank=0, world=1):
    """(N, k) float32: sum of reference log-probs of each of the k sequences of every example, in dataset order.
    With cfg.pack the rows are packed, as in training: every prompt is encoded once here too. Under torchrun
    (world > 1, every process calls this) process r scores examples r, r + world, ..., and all get the table."""
    k, share = SEQS_PER_EXAMPLE[cfg.method], -(-len(dataset) // world)
    # every process runs as many batches (under FSDP each forward gathers weights: a collective), so a
    # shorter share is topped up with example 0, whose rows are dropped below
    mine = list(range(rank, len(dataset), world))
    mine += [0] * (share - len(mine))
    out = []
    for s in tqdm(range(0, share, cfg.ref_batch_size), desc="reference log-probs", leave=False,
                  disable=not is_main()):
        examples = [dataset[i] for i in mine[s:s + cfg.ref_batch_size]]
        batch = micro_batch(cfg, examples, dataset.tokenizer.pad_token_id, scorer.model.config.vocab_size,
                            every_sequence=True)
        with autocast():
            out.append(reference_sums(cfg, scorer, to_device(batch, device)))  # (B, k)
    table = torch.cat(out)  # (share, k)
    if world > 1:
        parts = [torch.empty(share, k, device=device) for _ in range(world)]
        dist.all_gather(parts, table)
        table = torch.empty(len(dataset), k, device=device)
        for r, part in enumerate(parts):
            table[r::world] = part[:len(range(r, len(dataset), world))]
    return table.cpu()


def file_digest(paths):
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


# How the reference log-probs are computed; a new number invalidates every cache. 2: under autocast the head
# runs in bfloat16 (Scorer), as the policy's does, so a cache from version 1 (float32 head) would not match.
REFERENCE_VERSION = 2
CACHE_KEY_CHARS = 24  # hex digits of the reference-cache key


def reference_cache_key(cfg, tokenizer_dir):
    """A name that changes whenever the method, the data, the tokenizer and its chat template, the reference
    weights and config.json (a sliding window or RoPE setting changes the log-probs of the same weights), whether
    they are LoRA's base, the cut length, the compute dtype, packing or the way reference log-probs are
    computed (REFERENCE_VERSION) change. Packed and plain rows give the same log-probs to rounding
    (tests/test_scale.py); the key keeps them apart anyway, so that one configuration always trains on the
    same numbers."""
    weights = sorted(Path(cfg.model).glob("model*.safetensors"))
    tokenizer = [Path(tokenizer_dir) / name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
    parts = [f"v{REFERENCE_VERSION}", cfg.method, str(cfg.max_len), cfg.dtype, str(cfg.lora_rank > 0), str(cfg.pack),
             file_digest([cfg.data]), *(f"{p.name}:{file_digest([p])}" for p in tokenizer),
             file_digest([Path(cfg.model) / "config.json"]), file_digest(weights)]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=CACHE_KEY_CHARS // 2).hexdigest()


# --- checkpoints and resume
#
# HF weights (model.py), plus what an exact resume needs. All tensors go to safetensors, the
# rest to JSON; the folder is written under a temporary name and renamed once complete.


def save_checkpoint(path, model, tokenizer_dir, opt, sampler, step, cfg, lora, rank_rng=None):
    """Write checkpoint folder `path` atomically. model: the whole network (whole_model); opt: the optimizer's
    state dict with whole tensors (whole_optimizer_state); rank_rng: every process's generator states."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(merged_copy(model) if lora else model, tmp, tokenizer_dir=tokenizer_dir)
    if lora:
        adapters = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}
        save_file(adapters, tmp / "adapter.safetensors")
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous()
               for i, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tensors.update({f"rng.{name}": state for name, state in (rank_rng or {}).items()})
    save_file(tensors, tmp / "trainer_state.safetensors")
    state = {"step": step, "sampler": sampler.state_dict(), "param_groups": opt["param_groups"],
             "python_rng": random.getstate(), "config": asdict(cfg)}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
    if path.exists():  # re-saving the same step: swap the old folder out only once the new one is complete
        old = path.with_name(f".{path.name}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def read_tensors(file, what):
    """Every tensor of a checkpoint's safetensors file; a missing or damaged file is an error naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: file not found ({what})")
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a bad header or a truncated file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def load_adapters(path, model):
    """Put a checkpoint's LoRA adapters into `model` (before FSDP shards it)."""
    path = Path(path) / "adapter.safetensors"
    adapters = read_tensors(path, "a LoRA checkpoint keeps its adapters there")
    try:
        missing, unexpected = model.load_state_dict(adapters, strict=False)
    except RuntimeError as e:  # a shape that differs from the model's (another rank): torch lists each one
        raise ValueError(f"{path}: adapters do not match the model ({' '.join(str(e).split())})") from None
    if unexpected or any(".lora_" in k for k in missing):
        raise ValueError(f"{path}: adapters do not match the model "
                         f"(unexpected {unexpected[:3]}, missing {[k for k in missing if '.lora_' in k][:3]})")


# What a resume reads from trainer_state.json, and the JSON type of each
TRAINER_STATE_KEYS = {"step": (int, "an integer"), "sampler": (dict, "an object"), "param_groups": (list, "a list"),
                      "python_rng": (list, "a list"), "config": (dict, "an object")}


def read_trainer_state(checkpoint):
    """A checkpoint's trainer_state.json, with the keys a resume reads. The folder is renamed into place only
    once complete, so a damaged file was changed afterwards (by hand, a disk fault): an error names it."""
    file = Path(checkpoint) / "trainer_state.json"
    state = read_json(file)
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(state).__name__}")
    for key, (kind, what) in TRAINER_STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{file}: {key!r} should be {what}, got {state.get(key)!r:.80}")
    return state


def read_trainer_tensors(checkpoint):
    """The optimizer moments and generator states of a checkpoint (trainer_state.safetensors)."""
    file = Path(checkpoint) / "trainer_state.safetensors"
    tensors = read_tensors(file, "every checkpoint keeps its optimizer moments there")
    if "rng.torch" not in tensors:
        raise ValueError(f"{file}: missing tensor 'rng.torch' (the generator state every checkpoint saves)")
    return tensors


def load_trainer_state(path, optimizer, sampler, rank=0, device=None):
    """Restore optimizer, data position and generators from a checkpoint; returns its step."""
    path = Path(path)
    state = read_trainer_state(path)
    tensors = read_trainer_tensors(path)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state's ids, in order
    opt_state = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            p = params[int(i)]
            if hasattr(p, "device_mesh") and t.shape == p.shape:  # FSDP: p is a DTensor; keep the same shard
                from torch.distributed.tensor import distribute_tensor  # (a second to import: only when needed)
                t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
            opt_state.setdefault(int(i), {})[name] = t
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(tensors["rng.torch"])
    # rng.cuda.<device> in device order (not rng.cuda.rank<r>, below); a machine with fewer GPUs takes the first ones
    devices = sorted(int(k.rsplit(".", 1)[1]) for k in tensors if re.fullmatch(r"rng\.cuda\.\d+", k))
    if devices and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in devices][:torch.cuda.device_count()])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    if f"rng.cpu.rank{rank}" in tensors:  # under torchrun each process continues with its own generators
        torch.set_rng_state(tensors[f"rng.cpu.rank{rank}"])
    if f"rng.cuda.rank{rank}" in tensors and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)
    return state["step"]


def whole_optimizer_state(optimizer):
    """optimizer.state_dict() with whole tensors, on rank 0 (None on the others). Under FSDP the moments are
    DTensors, one shard per process: full_tensor() gathers each, a collective that every process joins."""
    sd = optimizer.state_dict()
    state = {}
    for i, s in sd["state"].items():
        whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in s.items()}
        state[i] = {k: v.cpu() for k, v in whole.items()} if is_main() else None
    return {"state": state, "param_groups": sd["param_groups"]} if is_main() else None


def whole_model(model, cfg, lora, load_dtype):
    """The network with whole weights, on rank 0: the model itself, or under FSDP a CPU copy built from the
    gathered shards (None on the other ranks; every process must call it, the gather is a collective)."""
    if not cfg.fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    with torch.random.fork_rng(devices=[]):  # add_lora draws A matrices: rank 0's dropout stream must not move
        whole = load_model(cfg.model, dtype=load_dtype)
        if lora:
            add_lora(whole, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    whole.load_state_dict(state, strict=True)
    return whole


def gather_rng_states(device, world):
    """{"cpu.rank{r}": state, ...} for every process (each draws its own dropout masks); {} for one process."""
    if world == 1:
        return {}
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    states = {}
    for name, state in mine.items():
        gathered = [torch.empty_like(state, device=device) for _ in range(world)]
        dist.all_gather(gathered, state.to(device))
        states.update({f"{name}.rank{r}": s.cpu() for r, s in enumerate(gathered)})
    return states


def _step_of(checkpoint):
    """N of a checkpoint-N folder, or None for another name."""
    n = checkpoint.name.split("-", 1)[1]
    return int(n) if n.isdigit() else None


def checkpoints(folder):
    """The complete checkpoint-N folders in `folder`, oldest (smallest N) first."""
    found = [p for p in Path(folder).glob("checkpoint-*")
             if _step_of(p) is not None and (p / "trainer_state.json").is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(path):
    """`path` itself when it is a checkpoint, else its checkpoint-N folder with the largest N."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"--resume {path}: no checkpoint-N folder with a trainer_state.json in it")
    return found[-1]


# --- the training loop


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss or gradient); the message says why and what was kept."""


def build_toy(cfg, examples, kind):
    """--model toy: train a tokenizer on the data's own text and build a seeded from-scratch model; save both."""
    base = Path(cfg.out) / "base"
    texts = (text for ex in examples for text in example_texts(kind, ex))
    tokenizer_dir = train_tokenizer(texts, cfg.toy_vocab, base)
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(cfg.seed)
    config = toy_config(len(tok), preset=cfg.toy_preset, eos_token_id=tok.eos_token_id)
    save_model(Transformer(config), base, tokenizer_dir=None)
    return str(base)


def evaluate_loss(scorer, dataset, ref, cfg, device, autocast):
    """Loss and metrics over a held-out dataset, no gradients, as if it were one batch (so the batch size does
    not change them): DPO / IOPO average over its examples, SFT's NLL over all its response tokens."""
    totals, count = {}, 0
    sft = cfg.method == "sft"
    with torch.no_grad():
        for s in range(0, len(dataset), cfg.batch_size):
            idx = list(range(s, min(s + cfg.batch_size, len(dataset))))
            batch = micro_batch(cfg, [dataset[i] for i in idx], dataset.tokenizer.pad_token_id,
                                scorer.model.config.vocab_size)
            # SFT: a denominator of 1 gives the batch's NLL sum; the set's token count divides it at the end
            loss, metrics = policy_loss(cfg, scorer, to_device(batch, device), None if ref is None
                                        else ref[idx].to(device), autocast, 1.0 if sft else None)
            weight = 1 if sft else len(idx)
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * weight
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if sft else len(idx)
    return {f"eval/{k}": v / count for k, v in totals.items()}


def place_scorer(scorer, cfg, frozen=False):
    """Under --fsdp, shard with FSDP2: each block's tensors become DTensors (a shard per process), gathered
    only for its forward and backward; then the root (embeddings, final norm, head). fully_shard moves a CPU
    module's tensors to the GPU as it shards them, one block at a time, so no GPU ever holds the whole model.
    The root keeps its weights gathered from its forward until its backward; a frozen network never runs
    backward, so its root gives them back after each forward instead."""
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in scorer.model.model.layers:
            fully_shard(layer)
        fully_shard(scorer, **({"reshard_after_forward": True} if frozen else {}))
    return scorer


def starting_weights(cfg, load_dtype, device, packed_attention):
    """A frozen Scorer of the starting weights (full fine-tuning's reference once the policy moves), placed
    like the policy."""
    net = load_model(cfg.model, dtype=load_dtype, device="cpu" if cfg.fsdp else device).requires_grad_(False)
    return place_scorer(Scorer(net, packed_attention), cfg, frozen=True)


def usable_cache(cache, n, k):
    """Whether `cache` holds an (n, k) table of finite reference log-probs. A file that does not (cut short, edited,
    damaged on disk) is reported and computed again: it is only a cache, and its numbers cannot be trusted."""
    if not cache.is_file():
        return False
    try:
        table = read_tensors(cache, "the reference cache").get("ref_logps")
        why = ("holds no ref_logps tensor" if table is None
               else f"holds a table of shape {list(table.shape)}, expected [{n}, {k}]" if table.shape != (n, k)
               else "holds non-finite log-probs" if not torch.isfinite(table).all() else None)
    except ValueError as e:  # reported, not raised: a cache can always be computed again
        why = str(e).removeprefix(f"{cache}: ")
    if why:
        print(f"warning: reference cache {cache} {why}; computing it again")
    return why is None


def prepare_reference(cfg, model, scorer, dataset, lora, resume_dir, load_dtype, device, autocast):
    """(ref_all, ref_scorer): the cached (N, k) reference log-probs of every example, or (with
    --ref-on-the-fly) the network that computes them at each step; the other one is None."""
    if cfg.ref_on_the_fly:
        # LoRA: the same network with adapters off; full fine-tuning: a frozen copy of the start weights
        if lora:
            return None, scorer
        return None, starting_weights(cfg, load_dtype, device, scorer.packed_attention)

    def cache_of(key):  # beside --out, so that runs on the same data and weights share it
        return Path(cfg.out).parent / "ref_cache" / f"{cfg.method}-{key}.safetensors"

    # Rank 0 alone reads the weights to hash them and looks for the cache; the others take its answer (key +
    # "1" when cached), sent as bytes in a tensor (broadcast_object_list would do it with pickle). If rank 0
    # fails, every process stops: none is left waiting in the broadcast.
    answer, error = "!" * (CACHE_KEY_CHARS + 1), None
    if is_main():
        try:
            key = reference_cache_key(cfg, cfg.model)
            answer = key + str(int(usable_cache(cache_of(key), len(dataset), SEQS_PER_EXAMPLE[cfg.method])))
        except Exception as e:
            error = e
    if dist.is_initialized():
        code = torch.tensor(list(answer.encode()), dtype=torch.uint8, device=device)
        dist.broadcast(code, src=0)
        answer = bytes(code.tolist()).decode()
    if error is not None:
        raise error
    if answer.startswith("!"):
        raise RuntimeError("rank 0 could not compute the reference-cache key; its error message says why")
    cache = cache_of(answer[:-1])
    if answer[-1] == "0":  # every process scores its share of the examples; rank 0 writes the table
        if resume_dir is not None and not lora:  # the policy has moved: reload the starting weights
            ref = starting_weights(cfg, load_dtype, device, scorer.packed_attention)
        else:
            ref = scorer
        ref.eval()
        with adapters_disabled(model):
            ref_all = reference_logps(ref, dataset, cfg, device, autocast, *rank_and_world())
        if ref is scorer and cfg.fsdp:
            # FSDP2 leaves the policy's root gathered after these forwards (until a backward): shard it again,
            # or model.parameters() would hand the optimizer whole tensors instead of this process's shards
            scorer.reshard()
        else:
            del ref
            gc.collect()  # a sharded copy's hooks keep it alive in reference cycles
        if is_main():
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, lambda tmp: save_file({"ref_logps": ref_all.contiguous()}, tmp))
    barrier()
    with safe_open(cache, framework="pt") as f:
        ref_all = f.get_tensor("ref_logps")
    if len(ref_all) != len(dataset):
        raise ValueError(f"{cache}: {len(ref_all)} reference rows for {len(dataset)} examples")
    return ref_all, None


def _require_at_least(cfg, **least):
    """Stop at the first field of a config below its smallest allowed value, naming the flag."""
    for key, low in least.items():
        if getattr(cfg, key) < low:
            raise ValueError(f"--{key.replace('_', '-')} must be at least {low}, got {getattr(cfg, key)}")


def default_lr(method):
    """The paper's peak learning rates: 1e-4 for SFT, 5e-6 for DPO and IOPO."""
    return 1e-4 if method == "sft" else 5e-6


# The metrics.jsonl names the progress bar shows, and its short names for them
SHOWN_METRICS = {"loss": "loss", "margins": "margins", "accuracy": "acc", "accuracy/output": "acc_out",
                 "accuracy/input": "acc_in"}

# What --resume lets the command line change: how the run is executed, not what it computes (to rounding)
HOW_TO_RUN = ("device", "grad_checkpointing", "compile", "pack", "packed_attention", "fsdp", "dist_timeout",
              "ref_on_the_fly", "ref_batch_size", "eval_every", "save_every", "keep_checkpoints", "log_every")


def resolve_resume(cfg, given=()):
    """(config, checkpoint folder, its step). With cfg.resume, the checkpoint's saved config decides, except
    `out` and the HOW_TO_RUN fields named in `given` (main passes the flags on its command line); any other
    field in `given` must match the saved value. Without it: (cfg, None, 0)."""
    if not cfg.resume:
        return cfg, None, 0
    resume_dir = latest_checkpoint(cfg.resume)
    state = read_trainer_state(resume_dir)
    saved = state["config"]
    # the saved config is resolved (--model toy is the built model, --lr 0 the method's default): so is this
    typed = {k: getattr(cfg, k) for k in given}
    if typed.get("model") == "toy":
        typed["model"] = str(Path(saved["out"]) / "base")
    if typed.get("lr") == 0:
        typed["lr"] = default_lr(cfg.method)
    differ = [k for k in typed if k not in HOW_TO_RUN + ("out", "resume") and typed[k] != saved.get(k)]
    if differ:
        raise ValueError(f"--resume {cfg.resume} continues the saved run, which has "
                         + ", ".join(f"{k}={saved.get(k)!r} (given: {typed[k]!r})" for k in differ)
                         + f"; only {', '.join(HOW_TO_RUN)} may change (drop the others, or start a new run)")
    cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in given if k in HOW_TO_RUN},
                         "out": cfg.out, "resume": cfg.resume})
    return cfg, resume_dir, state["step"]


def check_settings(cfg, resuming):
    """Stop at the first setting that is out of range or inconsistent, naming its flag, before anything is
    loaded or written."""
    if cfg.method not in SEQS_PER_EXAMPLE:
        raise ValueError(f"method must be sft, dpo or iopo, got {cfg.method!r}")
    if cfg.variant not in IOPO_VARIANTS:
        raise ValueError(f"variant must be one of {IOPO_VARIANTS}, got {cfg.variant!r}")
    if not cfg.data:
        raise ValueError("--data is required: a training file in the method's format (see data.py)")
    if cfg.pack and cfg.method == "sft":
        raise ValueError("--pack shares a prompt between two answers: it applies to dpo and iopo, not sft")
    if cfg.variant != "full" and cfg.method != "iopo" and not resuming:  # (older runs saved it unchecked)
        raise ValueError(f"--variant chooses among IOPO's losses: it applies to iopo, not {cfg.method}")
    if cfg.packed_attention not in ("mask", "rows", "auto"):
        raise ValueError(f"--packed-attention must be mask, rows or auto, got {cfg.packed_attention!r}")
    _require_at_least(cfg, batch_size=1, grad_accum=1, max_len=1, max_steps=0, save_every=0, keep_checkpoints=0,
                      ref_batch_size=1, log_every=1, eval_every=0, eval_size=0)
    # Either alone would be ignored (a resumed run may stop evaluating: its held-out examples stay out)
    if (cfg.eval_every and not cfg.eval_size) or (cfg.eval_size and not cfg.eval_every and not resuming):
        raise ValueError(f"--eval-every and --eval-size go together (every N steps, the loss on M held-out "
                         f"examples); got --eval-every {cfg.eval_every} and --eval-size {cfg.eval_size}")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise ValueError(f"--warmup-ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if cfg.epochs <= 0 or cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--epochs must be positive and --dtype float32 or bfloat16; got {cfg.epochs}, {cfg.dtype!r}")
    if not cfg.beta > 0 or not 0 <= cfg.label_smoothing < 0.5:  # a negative beta would prefer the loser
        raise ValueError(f"--beta must be > 0 and --label-smoothing in [0, 0.5); got {cfg.beta}, {cfg.label_smoothing}")
    if not cfg.dist_timeout > 0:
        raise ValueError(f"--dist-timeout must be a positive number of minutes, got {cfg.dist_timeout}")


def stale_outputs(cfg, resume_dir, resume_step):
    """[(path, why)] that this run removes from --out once its data has been read. A folder that holds an
    earlier run (metrics.jsonl, final/, checkpoint-N) is an error without --overwrite, since its checkpoints would
    stay mixed with this run's; with it, they all go. --resume OUT --out OUT from an older checkpoint drops
    the later checkpoints: they belong to the abandoned steps."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, expected a folder")
    # a model folder (--out mistyped, or the same as --model): the run's config.json would replace the model's
    if (out / WEIGHTS_NAME).is_file() or (out / INDEX_NAME).is_file():
        raise ValueError(f"--out {out} holds a model ({WEIGHTS_NAME} or {INDEX_NAME}), whose config.json this run "
                         f"would overwrite; choose another --out")
    if resume_dir is not None and out.resolve() == resume_dir.parent.resolve():
        return [(old, f"it is later than step {resume_step}, where this run continues")
                for old in checkpoints(out) if _step_of(old) > resume_step]
    found = checkpoints(out) if out.is_dir() else []
    earlier = [p for p in [out / "metrics.jsonl", out / "final", *found] if p.exists()]
    if earlier and not cfg.overwrite:
        resume = f"continue it with --resume {out}, or " if found else ""
        raise ValueError(f"--out {out} holds an earlier run ({', '.join(p.name for p in earlier)}): {resume}start "
                         f"over with --overwrite, or choose another --out")
    return [(old, "--overwrite: it belongs to the earlier run") for old in earlier]


def build_network(cfg, resume_dir, device, packed_attention):
    """(model, lora, scorer, load_dtype). Full fine-tuning trains every weight (resuming: the checkpoint's);
    LoRA freezes the starting weights and trains adapters (resuming: the checkpoint's adapters). The Scorer
    wraps the model with the log-prob kernel, sharded under --fsdp."""
    load_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" and cfg.lora_rank else torch.float32
    source = resume_dir if resume_dir is not None and not cfg.lora_rank else cfg.model
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn from it
    # Under FSDP the weights load on the CPU and reach the GPU block by block, as shards (place_scorer)
    model = load_model(source, dtype=load_dtype, device="cpu" if cfg.fsdp else device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    lora = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) if cfg.lora_rank else None
    if lora and resume_dir is not None:
        load_adapters(resume_dir, model)
    if cfg.compile:  # block by block: every block has the same code, so one compiled graph serves them all;
        for layer in model.model.layers:  # dynamic: batch widths change every step, and this compiles once
            layer.compile(dynamic=True)
    return model, lora, place_scorer(Scorer(model, packed_attention), cfg), load_dtype


def start_log(out, cfg, start):
    """Write the resolved config beside the run. A new run starts without metrics.jsonl (its first step creates
    it, so a run that stops before then leaves no trace of an earlier run); a resumed one keeps the lines of
    the steps its checkpoint covers and drops the later ones."""
    write_json_atomic(out / "config.json", asdict(cfg))
    log = out / "metrics.jsonl"
    if not start:
        log.unlink(missing_ok=True)
        return
    lines = log.read_text().splitlines() if log.exists() else []
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):  # a last line cut short by a kill during its append: a step after the checkpoint
                break
            raise ValueError(f"{log}:{n}: not valid JSON; the log of a resumed run is kept up to its checkpoint, "
                             f"so it must be readable (fix or remove that line)") from None
        if row.get("step", 0) <= start:
            kept.append(line)
    write_atomic(log, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def sft_denominator(batch, weight, world):
    """SFT's loss divides by the scored tokens of the whole global micro-batch, counted over all processes,
    so that every process's loss has the same scale; then by the number of processes, because DDP averages
    their gradients. weight is this process's share of the micro-batch (0 for a process left without one)."""
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float() * weight
    if world > 1:
        dist.all_reduce(n)
    return n.clamp(min=1) / world


def step_metrics(sums, grad_norm, n_tokens, world):
    """({metric: float} with "grad_norm", the step's token count): this process's sums of micro-batch metrics
    (device tensors), averaged over the processes, and their token counts added up, in one all-reduce and
    the one host-device synchronisation of the step."""
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    keys = list(sums) + ["grad_norm"]
    values = torch.stack([sums[k].float() for k in keys[:-1]] + [grad_norm.float()])
    if world > 1:  # the token counts travel with the metrics (the processes' shares may differ)
        values = torch.cat([values, torch.tensor([float(n_tokens)], device=values.device)])
        dist.all_reduce(values)
        values /= world  # means over ranks (the grad norm is the same on every rank: its mean is itself)
    values = values.tolist()
    if world > 1:
        n_tokens = round(values.pop() * world)
    return dict(zip(keys, values)), n_tokens


def periodic_checkpoint(cfg, out, step, model, lora, load_dtype, optimizer, sampler, device, world):
    """Write out/checkpoint-<step> (rank 0) and drop the ones beyond --keep-checkpoints; returns its path.
    Every process calls it: gathering the weights and moments (FSDP) and the RNG states are collectives."""
    rank_rng = gather_rng_states(device, world)
    whole, opt = whole_model(model, cfg, lora, load_dtype), whole_optimizer_state(optimizer)
    path = out / f"checkpoint-{step}"
    if is_main():
        save_checkpoint(path, whole, cfg.model, opt, sampler, step, cfg, lora, rank_rng)
        if cfg.keep_checkpoints:  # the newest ones up to this step stay, this one among them
            for old in checkpoints(out)[:-cfg.keep_checkpoints]:
                shutil.rmtree(old)
    barrier()
    return path


def train(cfg, given=()):
    """Run one training job; returns the folder of the final Hugging Face model. With cfg.resume, see
    resolve_resume for which settings come from the checkpoint."""
    cfg, resume_dir, resume_step = resolve_resume(cfg, given)
    check_settings(cfg, resume_dir is not None)
    cfg.lr = cfg.lr or default_lr(cfg.method)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    (rank, world), device = setup_distributed(device, cfg.dist_timeout)
    packed_attention = {"auto": "rows" if device.type == "cuda" else "mask"}.get(cfg.packed_attention,
                                                                                cfg.packed_attention)
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the model over torchrun's processes: run it under torchrun with 2 or more"
                         + (" (the saved run used --fsdp; --no-fsdp resumes it in one process)"
                            if resume_dir is not None and "fsdp" not in given else ""))
    out = Path(cfg.out)
    stale = stale_outputs(cfg, resume_dir, resume_step)  # removed once the data has been read

    # Data first: a bad file fails here, before any weights are loaded or anything is written.
    kind = cfg.method
    read_stats = ReadStats()
    records = RecordFile(cfg.data, kind, skip_bad=cfg.skip_bad, stats=read_stats)
    if (read_stats.skipped or read_stats.ties) and is_main():
        print(read_stats)
    if len(records) == 0:
        raise DataError(f"{cfg.data}: no usable {kind} examples")
    if cfg.eval_size >= len(records):
        raise ValueError(f"--eval-size {cfg.eval_size} would hold out all {len(records)} examples of {cfg.data}; "
                         f"it must be smaller, to leave some to train on")
    barrier()  # every process has looked at --out before rank 0 changes it
    if is_main():
        for old, why in stale:
            print(f"removing {old} ({why})")
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)
    barrier()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model == "toy":
        if is_main():
            cfg.model = build_toy(cfg, records, kind)
        barrier()
        cfg.model = str(out / "base")
    tok = load_tokenizer(cfg.model)
    # check=False: the seam check tokenizes every conversation a second time, and training never reports it
    # (python data.py FILE does)
    dataset = EncodedDataset(records, kind, tok, max_len=cfg.max_len, check=False)
    train_set, heldout = holdout_split(dataset, cfg.eval_size, seed=cfg.seed) if cfg.eval_size else (dataset, None)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {world} processes")

    model, lora, scorer, load_dtype = build_network(cfg, resume_dir, device, packed_attention)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.dtype == "bfloat16"
                else contextlib.nullcontext)

    # Reference log-probs: once, before training, from the starting weights (cached on disk), or per step.
    ref_all, ref_scorer = (None, None) if kind == "sft" else prepare_reference(
        cfg, model, scorer, dataset, lora, resume_dir, load_dtype, device, autocast)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg)
    sampler = BatchSampler(len(train_set), cfg.batch_size, seed=cfg.seed, group_by_length=cfg.group_by_length,
                           lengths=train_set.lengths() if cfg.group_by_length else None)
    micro_per_epoch = len(sampler)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    torch.manual_seed(cfg.seed + rank)  # dropout differs between processes, as their data does
    random.seed(cfg.seed)
    start = 0
    if resume_dir is not None:
        start = load_trainer_state(resume_dir, optimizer, sampler, rank, device)
        if is_main():
            print(f"resumed from {resume_dir} at step {start}")
    # What the step calls: DDP's wrapper (it averages gradients in backward), or the Scorer itself (one
    # process, or FSDP, which sharded it in place)
    net = nn.parallel.DistributedDataParallel(scorer) if world > 1 and not cfg.fsdp else scorer
    if is_main():
        start_log(out, cfg, start)

    def micro_batches():
        while True:
            yield from sampler

    batches_iter = micro_batches()
    # A copy from pageable memory waits for the GPU to finish its queue; from pinned memory it does not
    pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
    # The on-the-fly reference reads the policy's rows, except unpacked three_seq rows, which lack (x2, y2)
    ref_needs_full_rows = (ref_scorer is not None and not cfg.pack and cfg.method == "iopo"
                           and cfg.variant == "three_seq")
    ref_held = None  # --ref-on-the-fly: the held-out reference, computed at the first evaluation
    last_ckpt = resume_dir
    bar = tqdm(total=total, initial=start, desc=f"{kind}", disable=not is_main(), dynamic_ncols=True)
    model.train()
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = lr_at(step, total, cfg.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums, n_tokens = {}, 0
        for micro in range(cfg.grad_accum):
            positions = next(batches_iter)
            mine = positions[rank::world]  # this process's shard of the global micro-batch
            # An epoch's last micro-batch may not split evenly: each process weights its batch-mean loss by
            # its share, so that DDP's average over processes is the mean over the whole micro-batch. A process
            # left with nothing runs one example weighted 0: every process must join the gradient reduction.
            weight = len(mine) * world / len(positions)
            if kind == "sft":  # its loss is already normalised by the global micro-batch's tokens (n_total below)
                weight = float(weight > 0)
            mine = mine or positions[:1]
            examples = [train_set[p] for p in mine]
            batch = micro_batch(cfg, examples, tok.pad_token_id, model.config.vocab_size)
            n_tokens += int(batch["attention_mask"].sum()) if weight else 0  # counted on the CPU: no GPU wait
            batch = to_device(batch, device, pin)
            if ref_all is not None:
                ref = pin(ref_all[[train_set.indices[p] for p in mine]]).to(device, non_blocking=True)
            elif ref_scorer is not None:
                ref_batch = batch if not ref_needs_full_rows else to_device(
                    micro_batch(cfg, examples, tok.pad_token_id, model.config.vocab_size, every_sequence=True),
                    device, pin)
                with torch.no_grad(), adapters_disabled(model), autocast():
                    ref = reference_sums(cfg, ref_scorer, ref_batch)  # (B, k)
            else:
                ref = None
            n_total = sft_denominator(batch, weight, world) if kind == "sft" else None
            sync = world == 1 or micro == cfg.grad_accum - 1
            if cfg.fsdp:  # reduce-scatter the gradients only after the last micro-batch
                net.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or cfg.fsdp else net.no_sync()):
                loss, metrics = policy_loss(cfg, net, batch, ref, autocast, n_total)
                (loss * (weight / cfg.grad_accum)).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v * (weight / cfg.grad_accum)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable,
                                                   cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        row, n_tokens = step_metrics(sums, grad_norm, n_tokens, world)
        row = {"step": step + 1, **row, "lr": lr}
        if not all(math.isfinite(v) for v in row.values()):
            bar.close()
            raise TrainingStopped(f"step {step + 1}: non-finite loss or gradient ({row}); stopped before updating "
                                  f"the weights. Last good checkpoint: {last_ckpt or 'none (no checkpoint was saved)'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        row["tokens"], row["tokens_per_s"] = n_tokens, n_tokens / elapsed  # tokens: the step's, padding left out
        if heldout is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and (is_main() or cfg.fsdp):
            model.eval()
            if ref_all is not None:
                ref_held = ref_all[heldout.indices]
            elif ref_scorer is not None and ref_held is None:  # --ref-on-the-fly: the reference never changes
                with adapters_disabled(model):  # under FSDP every process is here: share the pass
                    ref_held = reference_logps(ref_scorer, heldout, cfg, device, autocast,
                                               *(rank_and_world() if cfg.fsdp else (0, 1)))
            row.update(evaluate_loss(scorer, heldout, ref_held, cfg, device, autocast))
            model.train()
        if is_main():
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if (step + 1) % cfg.log_every == 0:
                bar.set_postfix({name: f"{row[k]:.3f}" for k, name in SHOWN_METRICS.items() if k in row})
            bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            last_ckpt = periodic_checkpoint(cfg, out, step + 1, model, lora, load_dtype, optimizer, sampler,
                                            device, world)
    bar.close()
    seen = dataset.stats  # what this process encoded; `python data.py FILE` shows any example's tokens
    if is_main() and (seen.truncated or seen.special_text):
        print(f"of the {seen.examples} examples encoded{' by this process' if world > 1 else ''}: "
              f"{seen.truncated} were longer than --max-len {cfg.max_len} and were cut (LLaMA-Factory's rule; "
              f"{seen.cut_ties} of them then compare equal sequences, and their preference terms have no "
              f"gradient), {seen.special_text} hold text that spells a special token, read as that token")
    final = out / "final"
    whole = whole_model(model, cfg, lora, load_dtype)  # under FSDP every process sends rank 0 its shards
    if is_main():
        save_model(merged_copy(whole) if lora else whole, final, tokenizer_dir=cfg.model)
    barrier()
    return final


# --- the toy reproduction: `python iopo.py` with no arguments
#
# The paper's Table 3 in miniature, on a CPU: synthetic TRACE data (trace_gen.py), a tokenizer and a small
# model trained from scratch with SFT, then DPO and IOPO from the SFT model on the same instructions, each
# scored on separately drawn synthetic TRACE items by code (eval.py).


@dataclass
class ToyConfig:
    out: str = "runs/toy"  # everything goes under OUT/seed{seed}/
    seed: int = 0  # one seed drives the data, the model init and the data order
    n_train: int = 2000  # synthetic training instructions: SFT uses all, DPO and IOPO the first ones (--pref-steps)
    n_eval: int = 200  # evaluation items (drawn apart; many one-constraint prompts also occur in training)
    preset: str = "tiny"  # model.PRESETS size of the from-scratch model
    vocab: int = 1024  # tokenizer vocabulary
    sft_steps: int = 1200  # SFT optimizer steps (copying keywords from the prompt appears after ~1000)
    sft_lr: float = 6e-3  # SFT peak learning rate (a from-scratch toy wants far more than the paper's 1e-4)
    sft_batch: int = 16  # instructions per SFT step
    pref_steps: int = 200  # DPO / IOPO optimizer steps: one pass over the first --pref-steps x --pref-batch items
    pref_lr: float = 1e-4  # DPO / IOPO peak learning rate
    pref_batch: int = 8  # instructions per DPO / IOPO step (IOPO: 4 sequences each, DPO: 2)
    beta: float = 0.1  # DPO / IOPO beta
    max_new_tokens: int = 96  # generation budget per evaluation answer
    ablations: bool = False  # also IOPO without input / output preference (Table 4), and DPO on (x1, y1 > y2)
    threads: int = 1  # torch CPU threads; a model this small runs fastest on one (0: torch's default)
    summary: bool = False  # train nothing: summarise the seeds already under --out (reads only --out)


def toy_reproduction(tc):
    """Generate data, train SFT -> {DPO, IOPO, ablations}, evaluate all, print and save the comparison table."""
    # Data generation and scoring sit upstream and downstream of training; only this function needs them.
    import eval as evaluation
    import trace_gen

    # checked here, not minutes later when SFT is done
    _require_at_least(tc, n_train=1, n_eval=1, sft_steps=1, sft_batch=1, pref_steps=1, pref_batch=1, max_new_tokens=1)
    if tc.threads < 0 or not tc.beta > 0 or tc.preset not in PRESETS:
        raise ValueError(f"--threads must be >= 0, --beta > 0 and --preset one of {list(PRESETS)}; got "
                         f"{tc.threads}, {tc.beta}, {tc.preset!r}")
    root = Path(tc.out) / f"seed{tc.seed}"
    t0 = time.time()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    data = trace_gen.generate_data(tc.n_train, tc.n_eval, tc.seed, toy=True, progress=False)
    trace_gen.write_outputs(data, root / "data")
    files = {kind: root / "data" / f"{kind}.jsonl" for kind in ("sft", "dpo", "iopo", "eval")}
    n_pref = tc.pref_steps * tc.pref_batch  # DPO and IOPO see the same instructions, once each
    for kind in ("dpo", "iopo"):
        files[kind] = root / "data" / f"{kind}_first{n_pref}.jsonl"
        evaluation.write_jsonl(files[kind], data[kind][:n_pref])
    if tc.ablations:  # DPO pairs from the quadruples' x1: IOPO's loser (y2) instead of a spoiled answer
        files["dpo_y2"] = root / "data" / f"dpo_y2_first{n_pref}.jsonl"
        evaluation.write_jsonl(files["dpo_y2"], [{"prompt": q["x1"], "chosen": q["y1"], "rejected": q["y2"]}
                                                 for q in data["iopo"][:n_pref]])
    seen = data["stats"]["eval_prompts_in_training"]
    print(f"[{time.time() - t0:5.0f}s] data: {len(data['sft'])} training instructions, {len(data['eval'])} eval items "
          f"({seen['items']} of their prompts also occur in training, by constraint count {seen['by_constraints']}) "
          f"-> {root / 'data'}")

    common = dict(seed=tc.seed, grad_accum=1, warmup_ratio=0.1, max_len=512, toy_preset=tc.preset, toy_vocab=tc.vocab,
                  log_every=10, overwrite=True)  # each toy run regenerates its whole folder
    sft = train(TrainConfig(method="sft", model="toy", data=str(files["sft"]), out=str(root / "sft"), lr=tc.sft_lr,
                            max_steps=tc.sft_steps, batch_size=tc.sft_batch, weight_decay=0.1, **common))
    print(f"[{time.time() - t0:5.0f}s] SFT done -> {sft}")
    runs = {"SFT": sft}
    jobs = [("DPO", "dpo", "full", "dpo"), ("IOPO", "iopo", "full", "iopo")]  # (label, method, variant, data)
    if tc.ablations:
        jobs += [("IOPO w/o input pref", "iopo", "no_input_pref", "iopo"),
                 ("IOPO w/o output pref", "iopo", "no_output_pref", "iopo"),
                 ("DPO with y2 as loser", "dpo", "full", "dpo_y2")]
    for label, method, variant, kind in jobs:
        out = root / label.lower().replace(" ", "_").replace("/", "")
        runs[label] = train(TrainConfig(method=method, model=str(sft), data=str(files[kind]), out=str(out),
                                        lr=tc.pref_lr, max_steps=tc.pref_steps, batch_size=tc.pref_batch,
                                        beta=tc.beta, variant=variant, **common))
        print(f"[{time.time() - t0:5.0f}s] {label} done -> {runs[label]}")

    items = data["eval"]
    reports = []
    for label, path in runs.items():
        net, tok = load_model(path), load_tokenizer(path)
        responses = evaluation.generate_responses(net, tok, items, max_new_tokens=tc.max_new_tokens, batch_size=50,
                                                  progress=False)
        report = {"label": label, **evaluation.score_trace(items, responses)}
        write_json_atomic(Path(path).parent / "eval_report.json", report)
        evaluation.write_jsonl(Path(path).parent / "eval_responses.jsonl",
                               [{"id": item["id"], "response": r} for item, r in zip(items, responses)])
        reports.append(report)
        print(f"[{time.time() - t0:5.0f}s] evaluated {label}")
    table = evaluation.compare_table(reports)
    evaluation.write_atomic(root / "results.md", table)
    write_json_atomic(root / "results.json", {r["label"]: r["metrics"] for r in reports})
    print(f"\nSynthetic TRACE, {len(items)} evaluation items, seed {tc.seed} ({time.time() - t0:.0f}s):\n\n{table}\n"
          f"One seed's ordering is noisy: run more seeds, then `python iopo.py toy --summary --out {tc.out}`")
    return reports


def toy_summary(out):
    """Markdown over every OUT/seed*/results.json: each method's mean ± standard deviation over the seeds,
    then every pair of methods compared seed by seed on IF-M. Each seed draws its own data, tokenizer and
    model, which moves every method at once; the paired gaps take that shared part out."""
    keys = ("IF-S", "IF-M", "CSR", "ISR", "PSR")
    runs = {}  # seed -> {method: {metric: value}}, in seed order; only folders named as toy_reproduction names them
    for f in Path(out).glob("seed*/results.json"):
        seed = f.parent.name[4:]
        if not seed.isdigit() or f.parent.name != f"seed{int(seed)}":
            continue
        try:
            results = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{f}: not JSON ({e})") from None
        if not isinstance(results, dict) or not results or not all(
                isinstance(m, dict) and all(isinstance(m.get(k), (int, float)) for k in keys)
                for m in results.values()):
            raise ValueError(f"{f}: not a toy results.json ({{method: {{metric: number}}}} with {', '.join(keys)})")
        runs[int(seed)] = results
    runs = dict(sorted(runs.items()))
    if not runs:
        raise ValueError(f"{out}: no seed*/results.json (run `python iopo.py toy --seed S --out {out}` first)")
    labels = list(dict.fromkeys(label for results in runs.values() for label in results))
    # mean ± sample standard deviation; one value has no spread to show
    spread = lambda xs: (f"{statistics.mean(xs):.1f}"  # noqa: E731
                         + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else ""))
    lines = [f"Seeds: {', '.join(map(str, runs))}; mean ± standard deviation over the seeds", "",
             "| method | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for label in labels:
        have = [results[label] for results in runs.values() if label in results]
        lines.append(f"| {label} | {len(have)} | " + " | ".join(spread([m[k] for m in have]) for k in keys) + " |")
    lines += ["", "IF-M gaps paired by seed, row minus column: mean ± standard deviation over the seeds that ran "
              "both (on how many of them the row is ahead : behind)", "",
              "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for row in labels:
        cells = []
        for col in labels:
            gaps = [r[row]["IF-M"] - r[col]["IF-M"] for r in runs.values() if row in r and col in r]
            if row == col or not gaps:  # no seed ran both
                cells.append("")
                continue
            sign = "+" if round(statistics.mean(gaps), 1) > 0 else ""
            cells.append(f"{sign}{spread(gaps)} ({sum(g > 0 for g in gaps)}:{sum(g < 0 for g in gaps)} of {len(gaps)})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _add_dataclass_args(parser, cls, skip=()):
    """One --flag per dataclass field (--flag / --no-flag for booleans), its help taken from the field's
    trailing comment, then the field's default. No argparse defaults: parsing returns only the flags on the
    command line, and the dataclass fills in the rest (so --resume knows which settings were typed)."""
    help_text = dict(re.findall(r"^\s+(\w+): [^=]+=[^#]*#\s*(.*)$", inspect.getsource(cls), flags=re.M))
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_text.get(f.name, '')} (default: {'on' if f.default else 'off'})")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            default = f" (default: {f.default})" if f.default != "" else ""  # --data, --resume: none
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text.get(f.name, "") + default)


def _parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    resume_note = textwrap.fill("--resume continues a run with the settings it saved; only these may differ: "
                                + ", ".join("--" + k.replace("_", "-") for k in HOW_TO_RUN),
                                width=78, break_on_hyphens=False)
    for method in SEQS_PER_EXAMPLE:
        _add_dataclass_args(sub.add_parser(method, help=f"train with {method.upper()}", epilog=resume_note,
                                           formatter_class=argparse.RawDescriptionHelpFormatter),
                            TrainConfig, skip=("method",))
    _add_dataclass_args(sub.add_parser("toy", help="the toy reproduction (what `python iopo.py` runs)"), ToyConfig)
    return parser


def main(argv=None):
    argv = (sys.argv[1:] if argv is None else argv) or ["toy"]
    args = vars(_parser().parse_args(argv))  # only the flags on the command line
    command = args.pop("command")
    try:
        if command == "toy" and args.get("summary"):
            print(toy_summary(ToyConfig(**args).out), end="")
        elif command == "toy":
            toy_reproduction(ToyConfig(**args))
        else:  # for --resume, the typed flags say how the saved run may continue
            print(f"final model: {train(TrainConfig(method=command, **args), set(args) | {'method'})}")
    except (TrainingStopped, DataError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
