"""bench.py's arithmetic (no timing): the model FLOPs that its MFU column divides by."""

import torch

import bench
import iopo
import model as M
from data import PROMPT, packed_attention_mask


def _batch(method, pack):
    fields, prompt, answer, n = bench.TRAIN_SHAPES["tiny"]
    examples = bench._synthetic_examples(method, n, prompt, answer, fields["vocab_size"])
    return iopo.micro_batch(iopo.TrainConfig(method=method, pack=pack), examples, 0, fields["vocab_size"])


def test_attention_pairs_follow_the_packed_mask_and_skip_padding():
    """Attention pairs: n^2/2 per real row, packed rows as data.packed_attention_mask allows, padding ignored."""
    for method in ("dpo", "iopo"):
        plain, packed = _batch(method, False), _batch(method, True)
        seg = packed["segment_ids"]
        real = seg != 0
        allowed = packed_attention_mask(seg)[:, 0] & real[:, :, None] & real[:, None, :]
        # the mask counts the diagonal whole, the n^2/2 convention half of it: n/2 per row apart
        assert bench._attention_pairs(packed) == int(allowed.sum()) - int(real.sum()) / 2
        x = int((seg[0] == PROMPT).sum())  # a packed row holds its prompt once: its causal half is saved once
        assert bench._attention_pairs(plain) - bench._attention_pairs(packed) == len(seg) * x * x / 2
    right_padded = {"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    assert bench._attention_pairs(right_padded) == 4 * 4 / 2 + 3 * 3 / 2


def test_model_flops_full_and_lora():
    """Model FLOPs: 6 (full) or 4 (LoRA) x body matmul weights x tokens, the head per scored token, plus attention."""
    fields, prompt, answer, n = bench.TRAIN_SHAPES["tiny"]
    c = M.ModelConfig(**fields)
    hd = c.hidden_size // c.num_attention_heads
    body = c.num_hidden_layers * (c.hidden_size * hd * 2 * (c.num_attention_heads + c.num_key_value_heads)
                                  + 3 * c.hidden_size * c.intermediate_size)
    batch = _batch("sft", False)
    tokens, scored = n * (prompt + answer), n * answer
    attention = 12 * n * (prompt + answer) ** 2 / 2 * c.num_attention_heads * hd * c.num_hidden_layers
    for lora, k in ((False, 6), (True, 4)):
        flops, counted = bench._model_flops(c, batch, lora)
        assert counted == tokens
        assert flops == k * body * tokens + k * c.vocab_size * c.hidden_size * scored + attention


def test_model_flops_by_hand_with_padding_and_head_dim():
    """A padded batch by hand, head_dim 6 (not 8 / 2): tokens 6 (padding not counted), 10 attention pairs;
    body 576 = 8*6*(2*2 + 2*1) + 3*8*12, head 10*8*3 = 240, attention 12*10*2*6 = 1440."""
    c = M.ModelConfig(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=6)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), "scored_index": torch.tensor([1, 2, 3])}
    for lora, want in ((False, 6 * 576 * 6 + 6 * 240 + 1440), (True, 4 * 576 * 6 + 4 * 240 + 1440)):
        got = bench._model_flops(c, batch, lora)
        assert got == (want, 6), f"lora={lora}: (flops, tokens) {got}, expected ({want}, 6)"
