"""A tiny byte-level BPE tokenizer with a ChatML template, built offline in a second.

Used by the tests and by bench.py (to pair with a randomly initialised model of a real
shape on a machine with no model hub).
"""

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
