"""GRPO maths on hand-built tensors: advantages, the clipped loss, k3 KL, masks, log-probs.

    python -m pytest tests/test_loss.py -v
"""

import math

import pytest
import torch

from engine import Rollouts, completion_mask_from_ends
from train_grpo import GRPOConfig, completion_logprobs, group_advantages, grpo_loss

torch.manual_seed(0)


def loss_of(logp, old, ref, adv, mask=None, beta=0.0, eps=0.2, loss_type="grpo", max_new_tokens=1, kl_cap=0.0,
            **totals):
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    cfg = GRPOConfig(beta=beta, epsilon=eps, loss_type=loss_type, max_new_tokens=max_new_tokens, kl_cap=kl_cap)
    return grpo_loss(logp, old, ref, adv, mask, cfg, **totals)


# --- advantages

def test_group_advantages_are_zscores_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 1.0, 1.0])
    adv = group_advantages(rewards, num_generations=4)
    g1 = rewards[:4]
    assert torch.allclose(adv[:4], (g1 - g1.mean()) / (g1.std() + 1e-4))
    assert adv[:4].sum().abs() < 1e-5 and adv[4:].sum().abs() < 1e-5
    assert adv[0] > 0 > adv[1]


def test_group_with_equal_rewards_has_zero_advantage_and_no_nan():
    adv = group_advantages(torch.tensor([0.2, 0.2, 0.2, 1.0, 0.0, 1.0]), num_generations=3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("value", [0.1, 0.2, 0.0, 1.0])
@pytest.mark.parametrize("scale", [True, False])
def test_a_zero_spread_group_of_16_has_exactly_zero_advantage(value, scale):
    # float32 mean of 16 x 0.1 is not exactly 0.1; divided by eps that used to leave -7.45e-5
    rewards = torch.cat([torch.full((16,), value), torch.tensor([1.0, 0.0] * 8)])
    adv = group_advantages(rewards, num_generations=16, scale=scale)
    assert torch.equal(adv[:16], torch.zeros(16))
    assert (adv[16:] != 0).all()


def test_unscaled_advantages_are_just_centred():
    adv = group_advantages(torch.tensor([1.0, 0.0]), num_generations=2, scale=False)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5]))


# --- the clipped objective

def test_ratio_is_clipped_on_both_sides_of_the_advantage_sign():
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]]))  # ratio 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    logp.requires_grad_(True)
    loss, stats = loss_of(logp, old, None, adv)
    # per sequence: -min(r*A, clip(r)*A): A>0,r=1.5 -> -1.2 (clipped); A<0,r=1.5 -> 1.5;
    # A>0,r=0.5 -> -0.5; A<0,r=0.5 -> 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    grad = logp.grad.squeeze(1)
    # clipped tokens get no gradient; unclipped ones get -A * ratio / N
    assert grad[0] == 0 and grad[3] == 0
    assert grad[1].item() == pytest.approx(1.5 / 4) and grad[2].item() == pytest.approx(-0.5 / 4)


@pytest.mark.parametrize("eps_high,clipped_above", [(0.28, 1.28), (0.0, 1.2)])
def test_clip_higher_bites_only_above_one_plus_epsilon_high_for_positive_advantages(eps_high, clipped_above):
    old = torch.zeros(5, 1)
    ratios = [1.25, 1.3, 1.25, 0.7, 0.75]
    logp = torch.log(torch.tensor(ratios)).view(5, 1).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    cfg = GRPOConfig(beta=0.0, epsilon=0.2, epsilon_high=eps_high)
    loss, stats = grpo_loss(logp, old, None, adv, torch.ones(5, 1, dtype=torch.bool), cfg)
    loss.backward()
    grad = logp.grad.squeeze(1)
    up = min(1.25, clipped_above)  # ratio 1.25, A > 0: free with clip-higher, clipped at 1.2 without
    # per sequence: -A * (clipped ratio where the clip bites); A < 0 below 1 - eps still clips at 0.8
    expected = [-up, -clipped_above, 1.25, 0.8, -0.75]
    assert loss.item() == pytest.approx(sum(expected) / 5)
    assert (grad[0] != 0) == (eps_high > 0) and grad[1] == 0 and grad[3] == 0
    assert grad[2] != 0 and grad[4] != 0  # the lower clip and A < 0 above 1 are untouched
    assert stats["clip_frac"] == pytest.approx((3 - (eps_high > 0)) / 5)


def test_on_policy_ratio_is_one_and_gradient_is_reinforce():
    logp = torch.randn(3, 5, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = loss_of(logp, logp.detach(), None, adv)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0
    loss.backward()
    # grpo: mean over 5 tokens then over 3 sequences -> d loss / d logp_it = -A_i / (5 * 3)
    assert torch.allclose(logp.grad, (-adv[:, None] / 15).expand(3, 5))


def test_zero_advantages_give_zero_policy_gradient():
    logp = torch.randn(4, 6, requires_grad=True)
    loss, _ = loss_of(logp, logp.detach() + 0.1 * torch.randn(4, 6), None, torch.zeros(4))
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(4, 6))


# --- k3 KL

def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.randn(2, 7, requires_grad=True)
    loss, stats = loss_of(logp, logp.detach(), logp.detach().clone(), torch.zeros(2), beta=0.5)
    assert stats["kl"] == 0.0 and loss.item() == 0.0
    loss.backward()
    assert torch.allclose(logp.grad, torch.zeros(2, 7))  # k3 has zero gradient at equality


def test_kl_is_non_negative_and_matches_the_k3_formula():
    logp, ref = torch.randn(8, 9), torch.randn(8, 9)
    _, stats = loss_of(logp, logp, ref, torch.zeros(8), beta=1.0)
    delta = ref - logp
    assert stats["kl"] == pytest.approx((torch.exp(delta) - delta - 1).mean().item(), rel=1e-5)
    assert stats["kl"] > 0
    for _ in range(20):
        a, b = torch.randn(4, 4) * 5, torch.randn(4, 4) * 5
        assert loss_of(a, a, b, torch.zeros(4), beta=1.0)[1]["kl"] >= 0


def test_kl_gradient_pulls_the_policy_towards_the_reference():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-2.0]])  # reference gives the token less probability
    loss, _ = loss_of(logp, logp.detach(), ref, torch.zeros(1), beta=1.0)
    loss.backward()
    assert logp.grad.item() > 0  # gradient descent lowers logp, towards ref


def test_kl_cap_bounds_one_outlier_token_and_its_gradient():
    """One sampled token the policy made e^5 = 148x less likely than the reference: its k3
    is ~142, ~1400x a typical token's, and its gradient alone would set the step."""
    logp = torch.full((1, 8), -0.1)
    logp[0, 3] = -6.0
    ref = torch.full((1, 8), -0.2)
    ref[0, 3] = -1.0
    k3 = lambda d: math.exp(d) - d - 1
    for cap, outlier in [(0.0, k3(5.0)), (10.0, 10.0)]:
        x = logp.clone().requires_grad_(True)
        loss, stats = loss_of(x, x.detach(), ref, torch.zeros(1), beta=1.0, kl_cap=cap)
        loss.backward()
        assert stats["kl"] == pytest.approx((7 * k3(-0.1) + outlier) / 8, rel=1e-5)
        assert stats["kl_max"] == pytest.approx(k3(5.0), rel=1e-5)  # the uncapped worst token, either way
        ordinary = x.grad[0, 0].item()
        assert ordinary == pytest.approx((1 - math.exp(-0.1)) / 8, rel=1e-4)  # d/dlogp of k3, / |o|
        if cap:
            assert x.grad[0, 3].item() == 0.0  # capped: in the loss's value, out of its gradient
        else:
            assert x.grad[0, 3].item() == pytest.approx((1 - math.exp(5.0)) / 8, rel=1e-4)


# --- masks and normalisation

def test_masked_tokens_contribute_nothing_to_loss_or_gradient():
    logp = torch.randn(2, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ref = logp.detach() - 1.0
    poisoned = ref.clone()
    poisoned[~mask] = float("inf")  # a masked position may hold anything, even inf
    adv = torch.tensor([1.0, -1.0])
    loss, _ = loss_of(logp, logp.detach(), poisoned, adv, mask=mask, beta=0.1)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.equal(logp.grad[~mask], torch.zeros(3))
    # and it equals the loss of the unmasked tokens alone
    short, _ = loss_of(logp[:1, :3], logp.detach()[:1, :3], ref[:1, :3], adv[:1], beta=0.1)
    full, _ = loss_of(logp[1:], logp.detach()[1:], ref[1:], adv[1:], beta=0.1)
    assert loss.item() == pytest.approx((short.item() + full.item()) / 2, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_types_weigh_tokens_as_documented(loss_type):
    per_token_adv = torch.tensor([1.0, 1.0])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logp = torch.zeros(2, 4, requires_grad=True)
    loss, _ = loss_of(logp, logp.detach(), None, per_token_adv, mask=mask, loss_type=loss_type,
                      max_new_tokens=8)
    loss.backward()
    g = -logp.grad  # weight of each token
    if loss_type == "grpo":      # 1/(N |o_i|): the short completion's token weighs 4x more
        assert g[0, 0].item() == pytest.approx(1 / 2) and g[1, 0].item() == pytest.approx(1 / 8)
    elif loss_type == "dapo":    # 1 / total tokens
        assert g[0, 0].item() == pytest.approx(1 / 5) and g[1, 0].item() == pytest.approx(1 / 5)
    else:                        # 1 / (N * max_new_tokens)
        assert g[0, 0].item() == pytest.approx(1 / 16) and g[1, 3].item() == pytest.approx(1 / 16)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batch_losses_add_up_to_the_full_batch_loss(loss_type):
    logp, old, ref = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.3
    adv = torch.randn(6)
    full, _ = loss_of(logp, old, ref, adv, mask=mask, beta=0.1, loss_type=loss_type, max_new_tokens=5)
    parts = sum(loss_of(logp[s], old[s], ref[s], adv[s], mask=mask[s], beta=0.1, loss_type=loss_type,
                        max_new_tokens=5, total_sequences=6, total_tokens=mask.sum())[0]
                for s in (slice(0, 2), slice(2, 3), slice(3, 6)))
    assert parts.item() == pytest.approx(full.item(), rel=1e-5)


def test_completion_mask_comes_from_positions_not_the_pad_id():
    eos = pad = 2  # SmolLM2 and many others: pad == eos
    ids = torch.tensor([[5, 6, eos, pad, pad],   # ends at 2: the EOS itself counts
                        [5, 6, 7, 8, 9],         # truncated
                        [eos, pad, pad, pad, pad]])
    mask, truncated = completion_mask_from_ends(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]
    mask, _ = completion_mask_from_ends(torch.tensor([[5, 9, 6, 2]]), [2, 9])  # any end token
    assert mask.tolist() == [[1, 1, 0, 0]]


# --- log-probs

def test_chunked_logprobs_equal_naive_log_softmax(monkeypatch, tiny_model_dir):
    import train_grpo
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    V = model.config.vocab_size
    torch.manual_seed(1)
    prompt = torch.randint(3, V, (3, 4))
    prompt[0, :2] = 0  # left padding on one row
    attn = torch.ones(3, 10, dtype=torch.long)
    attn[0, :2] = 0
    ids = torch.cat([prompt, torch.randint(3, V, (3, 6))], 1)
    roll = Rollouts(ids, attn, torch.ones(3, 6, dtype=torch.bool), 4, [""] * 3, torch.zeros(3, dtype=torch.bool))
    monkeypatch.setattr(train_grpo, "LOGPROB_CHUNK_BYTES", 4 * V * 5)  # 5 rows a chunk: 18 rows -> 4 chunks
    T = 0.7
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, roll, T)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits[:, 3:-1] / T
        naive = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 4:, None]).squeeze(-1)
        p = torch.softmax(logits.float(), -1)
        naive_entropy = -(p * torch.log_softmax(logits.float(), -1)).sum(-1)
    assert torch.allclose(logp, naive, atol=1e-5)
    assert torch.allclose(entropy, naive_entropy, atol=1e-4)
    # and gradients flow through the checkpointed chunks
    logp, _ = completion_logprobs(model, roll, T)
    logp.sum().backward()
    assert model.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_chunk_scores_and_differentiates_to_the_bit_as_plain_autograd(temperature):
    """The head's log-softmax writes its gradient into the logits' storage and skips the
    entropy when backward recomputes the chunk: a speed-up only, so log-probs, entropies
    and every gradient equal plain autograd's exactly, not just closely."""
    import train_grpo

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(7, 16)
    targets = torch.randint(0, 300, (7,))
    g = torch.randn(7)

    def plain(h):
        logits = head(h).float() / temperature
        logz = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
        with torch.no_grad():
            probs = torch.exp(logits - logz[:, None])
            return logp, logz - (probs * logits).sum(-1)

    results = []
    for ours in (False, True):
        head.weight.grad = None
        h = hidden.clone().requires_grad_(True)
        if ours:
            box = []
            logp = torch.utils.checkpoint.checkpoint(train_grpo._chunk_logprobs, head, h, targets, temperature, box,
                                                     use_reentrant=False)
            (entropy,) = box
        else:
            logp, entropy = plain(h)
        (logp * g).sum().backward()
        results.append((logp, entropy, h.grad, head.weight.grad))
    for ours, theirs in zip(*reversed(results)):
        assert torch.equal(ours, theirs)
    with torch.no_grad():  # and without autograd, as the reference is scored
        assert torch.equal(train_grpo._chunk_logprobs(head, hidden, targets, temperature), plain(hidden)[0])


def test_the_head_scores_only_tokens_inside_the_completion_mask(monkeypatch, tiny_model_dir):
    """Padding after an end token is never in a loss: its positions get 0 and no head rows,
    and the real tokens get what scoring every position gives them."""
    import train_grpo
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    V = model.config.vocab_size
    torch.manual_seed(3)
    ids = torch.randint(3, V, (3, 10))
    full = Rollouts(ids, torch.ones_like(ids), torch.ones(3, 6, dtype=torch.bool), 4, [""] * 3,
                    torch.zeros(3, dtype=torch.bool))
    ended = full._replace(completion_mask=torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]).bool())
    rows = []
    real = train_grpo._chunk_logprobs
    monkeypatch.setattr(train_grpo, "_chunk_logprobs", lambda head, h, *a: rows.append(len(h)) or real(head, h, *a))
    everything, _ = completion_logprobs(model, full, 0.8)
    assert sum(rows) == 18
    rows.clear()
    logp, entropy = completion_logprobs(model, ended, 0.8)
    mask = ended.completion_mask
    assert sum(rows) == int(mask.sum()) == 10
    logp.sum().backward()  # and the gradient flows back through the scattered rows
    assert torch.allclose(logp[mask], everything.detach()[mask], atol=1e-6)
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all() and (entropy[mask] > 0).all()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("completion_len", [6, 1])
def test_prompt_once_per_group_gives_the_same_logprobs_and_gradients(tiny_model_dir, completion_len):
    """Two groups of 3 completions, prompts of different lengths (one left-padded): the
    prompt-once pass must equal running every row's whole sequence, values and gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    V, G = model.config.vocab_size, 3
    torch.manual_seed(2)
    prompts = torch.randint(3, V, (2, 5))
    prompts[1, :2] = 0                                   # the second prompt is 2 tokens shorter
    prompt_ids = prompts.repeat_interleave(G, dim=0)     # (6, 5): rows of a group share their prompt
    attn = torch.ones(6, 5 + completion_len, dtype=torch.long)
    attn[G:, :2] = 0
    ids = torch.cat([prompt_ids, torch.randint(3, V, (6, completion_len))], 1)
    mask = torch.ones(6, completion_len, dtype=torch.bool)
    roll = Rollouts(ids, attn, mask, 5, [""] * 6, torch.zeros(6, dtype=torch.bool))
    weights = torch.randn(6, completion_len)
    results = []
    for group_size in (1, G):
        model.zero_grad()
        logp, entropy = completion_logprobs(model, roll, 0.9, group_size=group_size)
        (logp * weights).sum().backward()
        results.append((logp.detach(), entropy, [p.grad.clone() for p in model.parameters()]))
    (full, full_ent, full_grads), (shared, shared_ent, shared_grads) = results
    assert torch.allclose(shared, full, atol=1e-5) and torch.allclose(shared_ent, full_ent, atol=1e-4)
    for a, b in zip(full_grads, shared_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
