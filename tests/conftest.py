"""Shared pytest fixtures: a tiny model config, a seeded tiny model, and a tiny ChatML tokenizer folder."""

import json
import os
import sys
from pathlib import Path

# The suite is CPU-only by design (GPU figures come from bench.py): with a GPU visible, device "auto" would
# move some tests there, and the DDP tests fork after CUDA work, which PyTorch refuses. Hide it before torch
# is imported; tests and the processes they start then run the same on every machine.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402

# The tests use tiny tensors, where extra threads only add overhead; on a busy machine (CI runners, shared
# boxes) several OpenMP threads per process can make each small op 10-100x slower. One thread keeps the
# suite fast and its floating-point reductions in a fixed order.
torch.set_num_threads(1)

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SENTENCES = [
    "The river flows north through the old town.",
    "Write exactly three sentences and end with a question?",
    "Answer in lowercase letters only, please.",
    "Numbers like 12, 345 and 6789 appear here too.",
    "You are a helpful assistant.",
]


@pytest.fixture
def tiny_config():
    """2 layers, width 64, 4 query heads / 2 KV heads, vocab 320 (covers the chatml_tokenizer_dir ids); a fresh
    object per test, so a test that edits it cannot leak into another."""
    return M.ModelConfig(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=172,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)


@pytest.fixture
def tiny_model(tiny_config):
    """A freshly initialised float32 Transformer(tiny_config), seeded with 0 (a new one per test)."""
    torch.manual_seed(0)
    return M.Transformer(tiny_config)


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory):
    """A folder with a byte-level BPE tokenizer.json (vocab <= 320) trained on a few sentences, ChatML special
    tokens <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos), and a plain ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    out = tmp_path_factory.mktemp("chatml_tokenizer")
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE, "model_max_length": 2048}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
