"""IOPO: preference training on (input, output) quadruples, with SFT and DPO beside it for comparison.

This file holds, bottom-up: the log-prob kernel that turns final hidden states into log p(token), the
three losses (SFT, DPO, IOPO) as pure functions of per-sequence log-probs, and the training loop.

Papers followed:
- IOPO, Zhang et al. 2024, arXiv 2411.06208 (ACL 2025): the loss of Section 3 and the ablations of Table 4.
- DPO, Rafailov et al. 2023, arXiv 2305.18290: Eq. 7; label smoothing as in "conservative DPO".

What we simplify or leave out (kernel and losses):
1. Log-probs are sums over response tokens (as the authors' code does); no length normalisation.
2. The two-term ablations are the MEAN of their two Bradley-Terry terms, so every loss starts at ln 2
   when the policy equals the reference (SPEC writes them as sums; the gradient is halved, nothing else).
3. The log-prob kernel only scores positions whose label is not `ignore_index`; the others cost nothing.
"""

import os

import torch
import torch.nn.functional as F

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
#     per-token log-sum-exp, turns them in place into g * (onehot - softmax), and multiplies back to get
#     grad_hidden (chunk x D) and to accumulate grad_weight (V x D). Cost: 4 matmuls instead of 3.
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


_CPU_CHUNK_BYTES = 64 * 2**20  # size of one chunk's float32 logits on the CPU (tuned with bench.py --kernel)
_CUDA_CHUNK_BYTES = 1024 * 2**20  # on a GPU larger chunks keep the matmuls efficient


def _chunk_rows(n_rows, vocab_size, device):
    """Rows per chunk so that one chunk of float32 logits takes about _*_CHUNK_BYTES."""
    budget = _CUDA_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    rows = max(16, budget // (4 * vocab_size))
    return int(min(rows, max(n_rows, 1)))


def _chunk_lse_target(hidden, weight, labels):
    """One chunk, PyTorch: (exp(logits - row max) (c, V) float32, log-sum-exp (c,), target logit (c,), row sums (c,))."""
    logits = (hidden @ weight.T).float()  # (c, V)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    sum_exp = logits.sub_(row_max).exp_().sum(dim=1)  # logits now hold exp(logits - max)
    lse = row_max.squeeze(1) + sum_exp.log()
    return logits, lse, target, sum_exp


def _onehot_minus_softmax_(probs, labels, scale):
    """In place: softmax (c, V) -> scale * (onehot(labels) - softmax), the gradient of scale * log p(labels)."""
    probs.mul_(-scale[:, None])
    probs[torch.arange(len(labels), device=labels.device), labels] += scale
    return probs


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
        probs = exp_shifted.div_(sum_exp[:, None])  # (c, V) softmax
        factor = _onehot_minus_softmax_(probs, labels, ones).to(hidden.dtype) @ weight  # (c, D)
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
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for s in range(0, len(labels), ctx.chunk_rows):
            e = s + ctx.chunk_rows
            h, y, g = hidden[s:e], labels[s:e], grad_logps[s:e].float()
            if ctx.use_triton:
                grad_logits = _triton_softmax_grad_(h @ weight.T, lse[s:e], y, g)  # (c, V), input dtype
            else:
                probs = (h @ weight.T).float().sub_(lse[s:e, None]).exp_()  # (c, V) softmax, recomputed
                grad_logits = _onehot_minus_softmax_(probs, y, g).to(h.dtype)
            if want_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[s:e])  # (c, D)
            if want_weight:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, h)  # (V, D)
                else:  # low-precision weights: accumulate the chunks' products in float32
                    grad_weight += grad_logits.T @ h
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _triton_usable(device):
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def token_logprobs(hidden, weight, labels, ignore_index=-100, impl="auto", chunk_size=None):
    """log p(labels[...] | context) for every position, as float32 of labels' shape; 0.0 where ignored.

    hidden (..., D): final hidden states (after the last norm). weight (V, D): the lm_head weight, possibly
    the tied input embedding (it then receives this gradient plus the embedding's). labels (...): int64
    target ids, already shifted, `ignore_index` where nothing is scored. impl: "naive" (the reference
    above), "torch" (chunked PyTorch), "triton" (CUDA, or the CPU with TRITON_INTERPRET=1) or "auto"
    (triton on CUDA when importable, else torch). chunk_size: tokens per chunk (default: about 64 MB of
    float32 logits on CPU, 1 GB on GPU). The log-sum-exp is accumulated in float32 for every input dtype.
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
    scored = (flat_labels != ignore_index).nonzero().squeeze(1)  # only these rows cost anything
    y = flat_labels[scored]
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= weight.shape[0]):
        raise ValueError(f"token_logprobs: labels must lie in [0, {weight.shape[0]}) or equal "
                         f"ignore_index={ignore_index}; found {int(y.min())}..{int(y.max())}")
    h = flat_hidden if len(scored) == len(flat_labels) else flat_hidden[scored]  # (n, D)
    rows = chunk_size or _chunk_rows(len(y), weight.shape[0], hidden.device)
    use_triton = impl == "triton"

    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        frozen_head = not weight.requires_grad
        logps = _FusedLogProbs.apply(h.contiguous(), weight, y, rows, use_triton, frozen_head)
    else:  # evaluation, reference model: forward only, nothing saved
        logps = torch.cat([_forward_chunk(h[s:s + rows], weight, y[s:s + rows], use_triton, False)[0]
                           for s in range(0, len(y), rows)]) if len(y) else h.new_zeros(0, dtype=torch.float32)
    if len(scored) == len(flat_labels):
        return logps.reshape(labels.shape)
    out = logps.new_zeros(len(flat_labels)).index_copy(0, scored, logps)
    return out.reshape(labels.shape)


def sequence_logprobs(hidden, weight, labels, ignore_index=-100, impl="auto"):
    """Per-row sums L(y|x) over scored tokens, and the number of scored tokens: ((B,), (B,)) from (B, T) labels."""
    token_logps = token_logprobs(hidden, weight, labels, ignore_index=ignore_index, impl=impl)  # (B, T)
    return token_logps.sum(dim=-1), (labels != ignore_index).sum(dim=-1)


# --- losses
#
# Pure functions of per-sequence log-probs L(y|x) (sums over response tokens, SPEC §1), batch means.
# r(x, y) = L_policy(y|x) - L_ref(y|x). Metrics are detached batch means: float tensors, never .item(),
# so computing them costs no host-device synchronisation.


def sft_loss(token_logps, mask):
    """Mean negative log-likelihood over response tokens: -sum_t mask_t log p_t / sum_t mask_t (a scalar)."""
    mask = mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def _bradley_terry(z, label_smoothing):
    """-log sigmoid(z); with label smoothing eps: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta=0.1, label_smoothing=0.0):
    """DPO (arXiv 2305.18290, Eq. 7) on pairs (x, y_w, y_l):

        loss = -log sigmoid( beta * [r(x, y_w) - r(x, y_l)] )
    """
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
    """IOPO (arXiv 2411.06208, Section 3) on quadruples (x1, y1, x2, y2); r_ij = r(x_j, y_i) below as rIJ = r(xJ, yI).

        full:            -log sigmoid( beta * [ (r11 - r12) + (r22 - r21)      output preference (DPO's terms)
                                              + (r11 - r21) + (r22 - r12) ] / 2 )   input preference
                        = -log sigmoid( beta * (r11 + r22 - r12 - r21) )
        no_input_pref:   mean of -log sigmoid(beta (r11 - r12)) and -log sigmoid(beta (r22 - r21))
        no_output_pref:  mean of -log sigmoid(beta (r11 - r21)) and -log sigmoid(beta (r22 - r12))
        three_seq:       -log sigmoid( beta * (2 r11 - r12 - r21) )       (no (x2, y2): its args may be None)

    where r11 = r(x1, y1), r12 = r(x1, y2), r22 = r(x2, y2), r21 = r(x2, y1). The ablations average their
    two terms so that every variant equals ln 2 when the policy is the reference.
    """
    if variant not in IOPO_VARIANTS:
        raise ValueError(f"iopo_loss: variant must be one of {IOPO_VARIANTS}, got {variant!r}")
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
    """Detached batch means: rewards beta*r, margins, and output / input preference accuracies."""
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

    averaged over the batch; |y| is the number of scored response tokens (`sequence_logprobs`' second output).
    """
    term = -logp_y1_x1 / n_y1.clamp(min=1)
    if logp_y2_x2 is not None:
        term = term - logp_y2_x2 / n_y2.clamp(min=1)
    return term.mean()
