"""Prompts: the chat prompt through real chat templates, and the plain Q/A prompt.

    python -m pytest tests/test_prompts.py -v
"""

from conftest import make_tiny_tokenizer
from data import build_prompt, plain_prompt

COUNTDOWN_Q = "Using the numbers [4, 7, 3], create an expression that equals 25."


def test_smollm2_chat_template_renders_the_one_shot_chat(smollm2_gguf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    prompt = build_prompt(tok, COUNTDOWN_Q)
    assert prompt.startswith("<|im_start|>system\nYou are a mathematical puzzle solver.<|im_end|>\n")
    # the one-shot example, then the question with its rules, then the generation prompt
    example = prompt.index("<answer>5 * 2 + 3</answer><|im_end|>")
    question = prompt.index("<|im_start|>user\nUsing the numbers [4, 7, 3], create an expression that equals 25.")
    assert example < question
    assert "each number exactly once" in prompt[question:] and "<answer>" in prompt[question:]
    assert prompt.endswith("<|im_start|>assistant\n")
    # the prompt tokenizes to something SmolLM2 can read back exactly
    assert tok.decode(tok(prompt, add_special_tokens=False)["input_ids"]) == prompt  # as generate_rollouts encodes

    arithmetic = build_prompt(tok, "what is 15 + 8?")
    assert "<|im_start|>user\nwhat is 15 + 8?" in arithmetic and "<answer>42</answer>" in arithmetic


def test_prompt_is_canonical_whatever_the_spelling():
    tok = make_tiny_tokenizer(chat=True)
    assert build_prompt(tok, "WHAT IS 15+8") == build_prompt(tok, "what is 15 + 8?")
    assert build_prompt(tok, "using the numbers [4,7,3] create an expression that equals 25") == \
        build_prompt(tok, COUNTDOWN_Q)


def test_unrecognised_question_is_passed_through_as_one_user_turn():
    tok = make_tiny_tokenizer(chat=True)
    prompt = build_prompt(tok, "Tell me a joke.")
    assert prompt == "<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n"


def test_plain_prompt_for_a_tokenizer_without_chat_template():
    tok = make_tiny_tokenizer(chat=False)
    assert not tok.chat_template
    assert build_prompt(tok, "what is 15 + 8?") == "Q: what is 15 + 8? A:"
    countdown = build_prompt(tok, COUNTDOWN_Q)
    assert countdown.startswith("Q: " + COUNTDOWN_Q) and countdown.endswith(" A:")
    assert "<answer>" in countdown
    assert plain_prompt("Tell me a joke.") == "Q: Tell me a joke. A:"
