"""The rollout engine: token ids in, completions out, drawn exactly as the loss scores them.

What it buys: each prompt is prefilled once into a KV cache of its G completions,
tokens are drawn from softmax(logits / T) with no logit processors, and the loop stops
when the last row has ended. The cache is allocated once per shape and written in place,
so the one-token decode step can be compiled (--compile; on CUDA into CUDA graphs that
are recorded once per shape, not per call). The scoring passes reuse the idea: a
group's prompt runs once and its keys and values serve all G completions. What it
costs: a decode loop of our own beside transformers' generate, which stays available
(--sampler static | generate) for comparison, and attention over a cache rounded up to
LENGTH_BUCKET positions.

It knows nothing of rewards or the loss; train_grpo.py and inference.py call it.
"""

import functools
import inspect
import weakref
from typing import NamedTuple

import torch
import torch.utils.checkpoint


class Rollouts(NamedTuple):
    input_ids: torch.Tensor        # (N, P + L) prompt (left-padded) + completion tokens
    attention_mask: torch.Tensor   # (N, P + L) 0 on left padding, 1 elsewhere (as in generate)
    completion_mask: torch.Tensor  # (N, L) True up to and including the first end token
    prompt_len: int                # P
    texts: list                    # N decoded completions, special tokens removed
    truncated: torch.Tensor        # (N,) True if no end token within max_new_tokens

    def rows(self, index) -> "Rollouts":
        """The rows of a slice, or of a list of row numbers."""
        texts = self.texts[index] if isinstance(index, slice) else [self.texts[i] for i in index]
        return Rollouts(self.input_ids[index], self.attention_mask[index], self.completion_mask[index],
                        self.prompt_len, texts, self.truncated[index])


def concat_rollouts(parts, pad_id: int) -> Rollouts:
    """The rows of several Rollouts as one batch: prompts left-padded to the longest prompt
    (attention 0, so positions and log-probs do not move) and completions right-padded to
    the longest completion (outside the completion mask, like the padding after an end)."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_len for r in parts)
    L = max(r.input_ids.shape[1] - r.prompt_len for r in parts)
    pad = torch.nn.functional.pad
    ids, attention, completion = [], [], []
    for r in parts:
        p, n = r.prompt_len, r.input_ids.shape[1] - r.prompt_len
        ids.append(pad(r.input_ids, (P - p, L - n), value=pad_id))
        attention.append(torch.cat([pad(r.attention_mask[:, :p], (P - p, 0), value=0),
                                    pad(r.attention_mask[:, p:], (0, L - n), value=1)], dim=1))
        completion.append(pad(r.completion_mask, (0, L - n), value=False))
    return Rollouts(torch.cat(ids), torch.cat(attention), torch.cat(completion), P,
                    [t for r in parts for t in r.texts], torch.cat([r.truncated for r in parts]))


def with_completions(rollouts: Rollouts, completions: dict, pad_id: int) -> Rollouts:
    """A copy of `rollouts` in which row i holds completions[i] = (token ids ending in an end
    token, text) instead of what was sampled: off-policy rows (--worked_solutions).
    Completions are right-padded to the longest, as concat_rollouts pads them."""
    P, n = rollouts.prompt_len, rollouts.input_ids.shape[1] - rollouts.prompt_len
    L = max([n] + [len(ids) for ids, _ in completions.values()])
    pad = torch.nn.functional.pad
    ids = pad(rollouts.input_ids, (0, L - n), value=pad_id)  # new tensors: the sampled rows stay as they were
    attention = pad(rollouts.attention_mask, (0, L - n), value=1)
    completion = pad(rollouts.completion_mask, (0, L - n), value=False)
    truncated, texts = rollouts.truncated.clone(), list(rollouts.texts)
    for row, (token_ids, text) in completions.items():
        ids[row, P:] = pad_id
        ids[row, P:P + len(token_ids)] = torch.tensor(token_ids, device=ids.device)
        completion[row] = False
        completion[row, :len(token_ids)] = True
        truncated[row], texts[row] = False, text
    return Rollouts(ids, attention, completion, P, texts, truncated)


def end_token_ids(tokenizer, model) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS, the model's configured EOS
    ids (Qwen lists two), and the chat end-of-turn marker when the vocabulary has one."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid < len(tokenizer):
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def completion_mask_from_ends(completion_ids: torch.Tensor, end_ids) -> tuple:
    """(N, L) mask of real completion tokens, built from positions, not from the pad id:
    pad often equals EOS, and a mask of `ids != pad` would drop the EOS we want to learn.
    Returns (mask, truncated)."""
    L = completion_ids.shape[1]
    is_end = torch.isin(completion_ids, torch.tensor(end_ids, device=completion_ids.device))
    positions = torch.arange(L, device=completion_ids.device)           # (L,)
    first_end = torch.where(is_end, positions, L).min(dim=1).values      # (N,) L when none
    mask = positions[None, :] <= first_end[:, None]                      # (N, L)
    return mask, first_end == L


def encode_prompts(tokenizer, prompts, device, multiple: int = 1):
    """Left-padded ids and mask: generation continues from the right edge. Chat prompts
    already hold their special tokens; adding more (a BOS) would change them. Only ids and
    mask go on: some tokenizers add token_type_ids, which decoders reject."""
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False,
                    pad_to_multiple_of=multiple if multiple > 1 else None)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids under left padding: count real tokens only, as generate does."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@functools.cache
def _cache_name(decoder_class) -> str:
    """transformers 5.2x renamed a forward pass's `past_key_values` (in and out) to `cache`;
    the old name warns and goes in 5.40, and earlier versions know only it."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def decode(model, cache=None, **inputs) -> tuple:
    """The decoder (no output head) on `inputs` with a KV cache in and out:
    -> (last hidden states, cache). `cache` None starts a new one."""
    name = _cache_name(type(model.base_model))
    out = model.base_model(**inputs, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.last_hidden_state, getattr(out, name)


def choose_sampler(name: str, device) -> str:
    """auto: our shared-prompt loop on a static KV cache (groups), on every device."""
    return "groups" if name == "auto" else name


def choose_compile(flag: str, device) -> bool:
    """auto: compile the decode step on CUDA, where a step is a few ms of kernel launches
    that CUDA graphs replay as one; not on CPU, where compiling costs more than it buys."""
    return flag == "on" or (flag == "auto" and str(device).startswith("cuda"))


def next_tokens(logits: torch.Tensor, temperature: float, greedy: bool) -> torch.Tensor:
    """Exactly the distribution the loss scores: softmax(logits / T) in float32, or argmax.

    One uniform per row, looked up in the cumulative distribution (torch.multinomial draws
    an exponential per vocabulary entry instead). The sum and the uniform are float64: in
    float32 each token's slice of [0, 1) would be rounded to a multiple of 6e-8 (floats in
    [0.5, 1) are that far apart), so a token of p = 2e-8 would be drawn with probability 0
    or 6e-8."""
    if greedy:
        return logits.argmax(-1)
    cdf = torch.softmax(logits.float() / temperature, dim=-1).double().cumsum_(-1)
    u = torch.rand(len(cdf), 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]  # scaled by the total: rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)  # right: never a p = 0 token


class NonFiniteLogits(RuntimeError):
    """The policy gave a NaN or infinite logit while sampling: its weights have diverged."""


def check_finite(bad: torch.Tensor) -> None:
    """One host sync per rollout, at its end, instead of one per token."""
    if bool(bad):
        raise NonFiniteLogits("the policy's logits hold NaN or infinity")


class FiniteGuard:
    """A logits processor for model.generate: notes any non-finite logit and hands on 0 in
    its place, so torch.multinomial never meets a NaN (on CUDA that is a device-side assert,
    which kills the process before anything can be saved)."""

    def __init__(self):
        self.bad = torch.zeros((), dtype=torch.bool)

    def __call__(self, input_ids, scores):
        finite = torch.isfinite(scores)
        self.bad = self.bad.to(scores.device) | ~finite.all()
        return torch.where(finite, scores, torch.zeros_like(scores))


# -----------------------------------------------------------------------------
# The sampler's KV cache: allocated once per shape, written in place.

LENGTH_BUCKET = 64  # cache lengths are rounded up to a multiple of this: a run meets a few shapes, not one per prompt


class StaticKV:
    """Keys and values of N rows for up to `length` positions, in buffers allocated once
    and written in place, with the mask of the positions a row attends to. The decode
    step then has one shape and its tensors one address, which torch.compile and CUDA
    graphs need (a DynamicCache grows by a torch.cat per token, and generate's static
    cache is built anew on every call). The prompt is written once per group: a prefill
    of B prompts fills the cache's B * G rows (`repeats`)."""

    def __init__(self, rows: int, length: int, num_layers: int, device):
        # Not a transformers Cache: its internals move between releases, and the decoder
        # needs only update() (and get_seq_length() on transformers 4).
        self.rows, self.length = rows, length
        self.keys, self.values = [None] * num_layers, [None] * num_layers  # allocated at the first prefill
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # where the next token's keys go
        self.valid = torch.zeros(rows, length, dtype=torch.bool, device=device)  # the positions rows attend to
        static_addresses(self.column, self.valid)
        self.repeats = 0  # > 0 while prefilling: each row in stands for this many rows of the cache
        self.visible = length  # positions attention reads: all when compiled (one shape), the filled ones when eager

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.repeats:  # prefill: B prompts in, each written for its G completions; attend to the prompt
            if self.keys[layer_idx] is None or self.keys[layer_idx].dtype != key_states.dtype:
                self.keys[layer_idx] = key_states.new_zeros(self.rows, key_states.shape[1], self.length,
                                                            key_states.shape[3])
                self.values[layer_idx] = value_states.new_zeros(self.rows, value_states.shape[1], self.length,
                                                                value_states.shape[3])
                static_addresses(self.keys[layer_idx], self.values[layer_idx])
            P = key_states.shape[2]
            self.keys[layer_idx][:, :, :P] = key_states.repeat_interleave(self.repeats, dim=0)
            self.values[layer_idx][:, :, :P] = value_states.repeat_interleave(self.repeats, dim=0)
            return key_states, value_states
        self.keys[layer_idx].index_copy_(2, self.column, key_states)
        self.values[layer_idx].index_copy_(2, self.column, value_states)
        return self.keys[layer_idx][:, :, :self.visible], self.values[layer_idx][:, :, :self.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # transformers 4 derives cache positions from it, which update() does not read


def static_addresses(*tensors) -> None:
    """Tells torch.compile these tensors keep their address from call to call, so a CUDA
    graph may write into them in place (it skips graphs that mutate any other input)."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)


def attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean (rows, 1, queries, keys) mask as this model's attention wants it, handed in
    4-D so transformers uses it as it is: SDPA takes True = attend, eager attention adds
    0 or the dtype's minimum."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed
    low = torch.finfo(model.dtype).min
    return torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device).masked_fill_(~allowed, low)


def prefill(model, kv: StaticKV, prompt_ids, prompt_mask, position_ids, repeats: int) -> torch.Tensor:
    """Runs B left-padded prompts once and writes their keys and values into the cache's
    B * repeats rows: -> (B, P, H) last hidden states. A padding position attends to itself
    only: a row that attends to nothing gives NaN, which the next layer's keys would spread."""
    P = prompt_ids.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=prompt_ids.device).tril()
    allowed = (causal[None] & prompt_mask[:, None, :].bool()) | torch.eye(P, dtype=torch.bool, device=causal.device)
    kv.repeats = repeats
    try:
        hidden, _ = decode(model, kv, input_ids=prompt_ids, attention_mask=attention_mask(model, allowed[:, None]),
                           position_ids=position_ids)
    finally:
        kv.repeats = 0
    kv.valid.zero_()
    kv.valid[:, :P] = prompt_mask.bool().repeat_interleave(repeats, dim=0)
    kv.column.fill_(P)
    return hidden


def decode_step(model, cache_name: str, kv: StaticKV, token, position) -> torch.Tensor:
    """One token per row through the decoder and the output head, against the static cache:
    (N,) tokens at (N,) positions -> (N, V) logits. The function torch.compile compiles."""
    kv.valid.index_fill_(1, kv.column, True)  # the new token attends to itself
    mask = attention_mask(model, kv.valid[:, None, None, :kv.visible])
    out = model.base_model(input_ids=token[:, None], position_ids=position[:, None], attention_mask=mask,
                           use_cache=True, **{cache_name: kv})
    kv.column += 1
    return model.get_output_embeddings()(out.last_hidden_state[:, -1])


def sync_interval(device) -> int:
    """Tokens between asks of "has every row ended?". On CUDA each ask makes the host wait
    for the GPU, and the queue of launched kernels runs dry; after the last row ends the
    extra steps only write padding. On CPU an ask costs nothing."""
    return 8 if device.type == "cuda" else 1


COMPILE_BACKEND = None  # torch.compile's backend; None = inductor (tests swap in a counting one)


class Decoder(NamedTuple):
    step: object   # decode_step, compiled or not
    caches: dict   # (rows, length) -> StaticKV
    compiled: bool


_decoders = weakref.WeakKeyDictionary()  # model -> Decoder, so caches and graphs live as long as the model


def decoder_for(model, compiled: bool) -> Decoder:
    """The model's decode step and caches, made once. Compiled, each cache shape is one
    graph, recorded the first time it is met (on CUDA as a CUDA graph: mode reduce-overhead)."""
    decoder = _decoders.get(model)
    if decoder is None or decoder.compiled != compiled:
        step = decode_step
        if compiled:
            device = next(model.parameters()).device
            mode = "reduce-overhead" if device.type == "cuda" and COMPILE_BACKEND is None else None
            step = torch.compile(decode_step, backend=COMPILE_BACKEND or "inductor", mode=mode, dynamic=False)
        decoder = _decoders[model] = Decoder(step, {}, compiled)
    return decoder


def static_cache(model, decoder: Decoder, rows: int, length: int, device) -> StaticKV:
    length = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
    if (rows, length) not in decoder.caches:
        decoder.caches[(rows, length)] = StaticKV(rows, length, model.config.num_hidden_layers, device)
    return decoder.caches[(rows, length)]


@torch.no_grad()
def sample_groups(model, prompt_ids, prompt_mask, num_generations: int, max_new_tokens: int,
                  temperature: float, end_ids, pad_id: int, greedy: bool = False, compiled: bool = False) -> torch.Tensor:
    """(B * G, <= max_new_tokens) completion ids, rows grouped by prompt: each prompt
    prefilled once into a static cache of its G completions, then one token per row per
    step (`decode_step`, compiled or eager) until every row has ended."""
    G, device = num_generations, prompt_ids.device
    decoder = decoder_for(model, compiled)
    kv = static_cache(model, decoder, len(prompt_ids) * G, prompt_ids.shape[1] + max_new_tokens, device)
    kv.visible = kv.length
    position_ids = positions_of(prompt_mask)
    hidden = prefill(model, kv, prompt_ids, prompt_mask, position_ids, G)
    logits = model.get_output_embeddings()(hidden[:, -1]).repeat_interleave(G, dim=0)  # (N, V)
    position = position_ids[:, -1].repeat_interleave(G, dim=0)
    ends = torch.tensor(list(end_ids), device=device)
    done = torch.zeros(len(logits), dtype=torch.bool, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    sync_every, cache_name = sync_interval(device), _cache_name(type(model.base_model))
    tokens = []
    for _ in range(max_new_tokens):
        bad |= ~torch.isfinite(logits).all()
        token = next_tokens(logits, temperature, greedy).masked_fill(done, pad_id)  # ended rows pad, as generate does
        tokens.append(token)
        done |= torch.isin(token, ends)
        if len(tokens) == max_new_tokens or (len(tokens) % sync_every == 0 and bool(done.all())):
            break
        position = position + 1
        if not compiled:  # eager: attend to the filled positions only, a shape per step costs nothing
            kv.visible = prompt_ids.shape[1] + len(tokens)
        logits = decoder.step(model, cache_name, kv, token, position)
    check_finite(bad)
    return torch.stack(tokens, dim=1) if tokens else prompt_ids.new_zeros(len(logits), 0)


def sampling_config(temperature: float, max_new_tokens: int, end_ids, pad_id, greedy: bool):
    """For model.generate: plain softmax(logits / T) sampling, or argmax, with every logit
    processor that a model's own config could switch on set to off. Greedy leaves the
    sampling knobs unset: transformers warns about each one given to a greedy search."""
    from transformers import GenerationConfig

    common = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=max_new_tokens,
                  eos_token_id=list(end_ids), pad_token_id=pad_id, use_cache=True)
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0, **common)


STATIC_BUCKET = 32  # static-cache prompts padded to a multiple of this: a run compiles for a few lengths


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts, num_generations: int, max_new_tokens: int,
                      temperature: float, end_ids, greedy: bool = False, sampler: str = "auto",
                      compiled: bool = False) -> Rollouts:
    """G completions of each prompt, rows grouped by prompt, with one of three samplers:
    groups (sample_groups, its decode step compiled if `compiled`), static (model.generate
    on a static KV cache, which transformers compiles into CUDA graphs on a GPU) or generate (model.generate with a dynamic cache on
    G copies of each prompt: the plain reference). Runs under the caller's autocast."""
    device = next(model.parameters()).device
    sampler = choose_sampler(sampler, device)
    G = num_generations
    was_training = model.training
    model.eval()  # checkpointing acts only in training mode, so the KV cache works here
    if sampler == "groups":
        ids, mask = encode_prompts(tokenizer, prompts, device)
        completion_ids = sample_groups(model, ids, mask, G, max_new_tokens, temperature, end_ids,
                                       tokenizer.pad_token_id, greedy, compiled)
        ids, mask = ids.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0)
    else:
        batch = [p for p in prompts for _ in range(G)]
        ids, mask = encode_prompts(tokenizer, batch, device, STATIC_BUCKET if sampler == "static" else 1)
        config = sampling_config(temperature, max_new_tokens, end_ids, tokenizer.pad_token_id, greedy)
        if sampler == "static":
            config.cache_implementation = "static"
        guard = FiniteGuard()
        completion_ids = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                        logits_processor=[guard])[:, ids.shape[1]:]
        check_finite(guard.bad)
    model.train(was_training)
    completion_mask, truncated = completion_mask_from_ends(completion_ids, end_ids)
    L = int(completion_mask.sum(1).max()) if completion_mask.numel() else 0  # drop columns of padding only
    completion_ids, completion_mask = completion_ids[:, :L], completion_mask[:, :L]
    texts = [tokenizer.decode(row[m], skip_special_tokens=True) for row, m in zip(completion_ids, completion_mask)]
    return Rollouts(torch.cat([ids, completion_ids], dim=1), torch.cat([mask, torch.ones_like(completion_ids)], dim=1),
                    completion_mask, ids.shape[1], texts, truncated)


# -----------------------------------------------------------------------------
# The scoring passes' decoder, with the prompt run once per group.

def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer, once per run, done here rather than
    by transformers, whose checkpointed layers drop any KV cache handed to them: ours keep
    it, so the scoring passes still run each group's prompt once. Like theirs it acts only
    in training mode with grad enabled (never while sampling). A model without
    transformers' checkpointable layers gets transformers' own checkpointing instead."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        kwargs = {"use_reentrant": False}  # the variant that works with frozen inputs
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    for layer in layers:
        layer.forward = functools.partial(checkpointed_forward, layer, layer.forward)


def checkpointed_forward(layer, forward, *args, **kwargs):
    """One decoder layer under activation checkpointing, KV cache included. The layer
    appends its keys and values to the cache as it runs (transformers rebinds the cache's
    tensors, never writes into them), so the recompute in backward first puts the cache
    back as the layer found it, and then sees exactly the inputs of the first run."""
    if not (layer.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    from transformers.cache_utils import Cache

    cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)  # GPT-2 passes it by position
    found = None if cache is None else (list(cache.layers), [dict(vars(c)) for c in cache.layers])

    def run(*inputs):
        if found is not None:
            cache.layers[:] = found[0]
            for c, state in zip(*found):
                c.__dict__.clear()
                c.__dict__.update(state)
        return forward(*inputs, **kwargs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def is_checkpointing(model) -> bool:
    """True if transformers' own checkpointing is on (ours keeps the KV cache)."""
    if hasattr(model, "is_activation_checkpointing"):  # transformers 5's name
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def prompt_group_size(model, rows_per_pass: int, num_generations: int) -> int:
    """G when a scoring pass of `rows_per_pass` sequences can run each prompt once for its
    group, else 1. Not under transformers' own checkpointing in training mode, which drops
    any KV cache handed to a layer. Decided once per batch for every pass: while policy
    and reference are equal their log-probs must agree exactly, or a 1e-7 difference is a
    KL gradient that Adam scales into a full-size step."""
    if rows_per_pass % num_generations or (model.training and is_checkpointing(model)):
        return 1
    return num_generations


def completion_hidden_states(model, rollouts: Rollouts, group_size: int = 1):
    """(N, L, H): the decoder's hidden state at each position that predicts a completion token.

    With group_size G > 1, rows come in groups of G completions of one prompt: the prompt
    runs once per group and its keys and values are repeated for the group's completions.
    Gradients through the repeated keys and values add up over the group, exactly as the G
    copies' would."""
    input_ids, attention_mask, P = rollouts.input_ids, rollouts.attention_mask, rollouts.prompt_len
    position_ids = positions_of(attention_mask)  # left padding shifts every prompt
    G, total = group_size, input_ids.shape[1]
    if G == 1:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False).last_hidden_state
        return hidden[:, P - 1:-1]
    prompt, cache = decode(model, input_ids=input_ids[::G, :P], attention_mask=attention_mask[::G, :P],
                           position_ids=position_ids[::G, :P])               # (B, P, H), one per group
    last = prompt[:, -1:].repeat_interleave(G, dim=0)                         # (N, 1, H) predicts token P
    if total - P == 1:
        return last
    cache.batch_repeat_interleave(G)                                          # (B, ...) -> (N, ...)
    rest, _ = decode(model, cache, input_ids=input_ids[:, P:-1], attention_mask=attention_mask[:, :-1],
                     position_ids=position_ids[:, P:-1])                      # (N, L - 1, H)
    return torch.cat([last, rest], dim=1)
