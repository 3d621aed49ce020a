"""The trainer end to end on a tiny random model, its CLI, and one real SmolLM2 step.

    python -m pytest tests/test_train.py -v
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import engine
import plumbing
import precision
import train_grpo
from plumbing import UsageError
from train_grpo import GRPOConfig, parse_args

ROOT = Path(__file__).resolve().parent.parent


def tiny_args(model_dir, out, *extra):
    return ["--model", model_dir, "--preset", "none", "--task", "countdown", "--num_iterations", "2",
            "--batch_size", "2", "--num_generations", "3", "--max_new_tokens", "8", "--eval_size", "4",
            "--eval_every", "1", "--plot_every", "1", "--sample_every", "1", "--save_every", "1",
            "--learning_rate", "1e-3", "--cpu_autocast", "off", "--cpu_linear", "torch",  # untimed: runs compare
            "--output_dir", str(out), *extra]


def steps_of(out):
    return json.loads((Path(out) / "grpo_metrics.json").read_text())["steps"]


# --- end to end

def test_two_steps_write_every_output(tiny_model_dir, tmp_path, varied_rewards):
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path)) == 0
    metrics = json.loads((tmp_path / "grpo_metrics.json").read_text())
    assert metrics["config"]["num_generations"] == 3
    assert [s["step"] for s in metrics["steps"]] == [1, 2]
    for key in ("reward_mean", "reward_std", "accuracy", "format_rate", "zero_spread_frac", "kl", "loss",
                "clip_frac", "entropy", "completion_len", "truncated_frac", "grad_norm", "learning_rate",
                "step_seconds", "gen_seconds", "tokens_per_second", "peak_memory_gb", "skipped_updates"):
        assert key in metrics["steps"][0], key
    assert [e["step"] for e in metrics["eval"]] == [0, 1, 2]
    assert all(e["n"] == 4 and "samples" in e for e in metrics["eval"])
    assert (tmp_path / "grpo_training_curve.png").stat().st_size > 1000
    assert (tmp_path / "grpo_kl_divergence.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (tmp_path / "grpo_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3 and {"question", "completion", "reward", "prompt"} <= rows[0].keys()
    assert (tmp_path / "checkpoints" / "step_000002" / "trainer_state.pt").is_file()
    assert not list(tmp_path.rglob("*.tmp"))  # every file was written whole, then renamed into place
    runtime = metrics["runtime"]
    assert runtime["device"].startswith("cpu (float32 weights)") and runtime["torch"] == torch.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert runtime["commit"] in (head, head + "-dirty") if head else runtime["commit"] is None
    import transformers
    assert runtime["transformers"] == transformers.__version__
    saved = tmp_path / "saved_model"
    assert json.loads((saved / "grpo_config.json").read_text())["task"] == "countdown"

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(saved)
    assert tok.chat_template and model.config.vocab_size == len(tok)
    # the weights changed: it trained
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters()))


def test_resume_continues_exactly_where_the_run_stopped(tiny_model_dir, tmp_path, varied_rewards):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_grpo.main(tiny_args(tiny_model_dir, straight, "--num_iterations", "4")) == 0
    assert train_grpo.main(tiny_args(tiny_model_dir, split, "--num_iterations", "2")) == 0
    assert train_grpo.main(tiny_args(tiny_model_dir, split, "--num_iterations", "4", "--resume")) == 0
    a, b = steps_of(straight), steps_of(split)
    assert [s["step"] for s in b] == [1, 2, 3, 4]  # nothing lost, nothing repeated
    # Step 4 is measured after step 3's update, which depends on the restored optimizer
    # moments: a resume that lost them would diverge here.
    for i in (2, 3):
        for key in ("reward_mean", "loss", "kl", "grad_norm", "completion_len"):
            assert b[i][key] == pytest.approx(a[i][key], rel=1e-4, abs=1e-6), (i + 1, key)


def test_learning_rate_decays_by_cosine_to_its_final_ratio():
    cfg = GRPOConfig(learning_rate=1e-3, final_lr_ratio=0.1, num_iterations=5)
    rates = [train_grpo.learning_rate_at(cfg, step) for step in range(1, 6)]
    assert rates[0] == pytest.approx(1e-3) and rates[2] == pytest.approx(0.55e-3) and rates[4] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = dataclasses.replace(cfg, final_lr_ratio=1.0)
    assert {train_grpo.learning_rate_at(constant, step) for step in range(1, 6)} == {1e-3}
    with pytest.raises(plumbing.UsageError, match="--final_lr_ratio must be between 0 and 1"):
        parse_args(["--final_lr_ratio", "1.5"])


def test_each_step_updates_at_its_scheduled_learning_rate(tiny_model_dir, tmp_path, varied_rewards, monkeypatch):
    used = []
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--optimizer", "adamw", "--num_iterations", "3",
                                     "--final_lr_ratio", "0.5", "--save_every", "0")) == 0
    assert used == pytest.approx([1e-3, 0.75e-3, 0.5e-3])
    assert [s["learning_rate"] for s in steps_of(tmp_path)] == pytest.approx(used)


def test_resume_uses_the_latest_checkpoint_not_later_metrics(tiny_model_dir, tmp_path):
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--save_every", "2", "--num_iterations", "3")) == 0
    # step 3 ran after the last checkpoint (step 2): resuming redoes it once, not twice
    for ckpt in (tmp_path / "checkpoints").glob("step_000003"):
        import shutil
        shutil.rmtree(ckpt)
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--save_every", "2", "--num_iterations", "3",
                                     "--resume")) == 0
    assert [s["step"] for s in steps_of(tmp_path)] == [1, 2, 3]
    sampled = [json.loads(line)["step"] for line in (tmp_path / "grpo_samples.jsonl").read_text().splitlines()]
    assert sampled == sorted(sampled) and sampled.count(3) == 2 * 3  # step 3's rows once, not twice


def test_plain_prompt_model_trains_too(tiny_plain_model_dir, tmp_path):
    args = tiny_args(tiny_plain_model_dir, tmp_path, "--task", "arithmetic", "--num_iterations", "1")
    assert train_grpo.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "grpo_samples.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("Q: what is ") and rows[0]["prompt"].endswith(" A:")


def test_micro_batching_matches_the_full_batch(tiny_model_dir, tmp_path, varied_rewards):
    full, micro = tmp_path / "full", tmp_path / "micro"
    assert train_grpo.main(tiny_args(tiny_model_dir, full, "--num_iterations", "1")) == 0
    assert train_grpo.main(tiny_args(tiny_model_dir, micro, "--num_iterations", "1", "--micro_batch_size", "2")) == 0
    a, b = steps_of(full)[0], steps_of(micro)[0]
    for key in ("loss", "kl", "grad_norm", "entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key


def test_a_previous_run_is_never_silently_overwritten(tiny_model_dir, tmp_path, capsys):
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "1")) == 0
    before = (tmp_path / "grpo_metrics.json").read_text()
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "1")) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "grpo_metrics.json").read_text() == before
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "1", "--overwrite")) == 0


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_resume_completes(tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    import signal
    real = train_grpo.grpo_step

    def interrupted(run, step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        return real(run, step)

    monkeypatch.setattr(train_grpo, "grpo_step", interrupted)
    args = tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "4", "--save_every", "0")
    assert train_grpo.main(args) == 0
    assert "--resume" in capsys.readouterr().out
    assert [s["step"] for s in steps_of(tmp_path)] == [1, 2]  # step 2 finished, then it stopped
    assert (tmp_path / "checkpoints" / "step_000002" / "trainer_state.pt").is_file()
    assert not (tmp_path / "saved_model").exists()
    monkeypatch.setattr(train_grpo, "grpo_step", real)
    assert train_grpo.main(args + ["--resume"]) == 0
    assert [s["step"] for s in steps_of(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "saved_model").is_dir()


def test_non_finite_update_is_skipped_and_counted(tiny_model_dir, tmp_path, monkeypatch):
    real = train_grpo.grpo_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(train_grpo, "grpo_loss", nan_loss)
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "1", "--save_every", "0")) == 0
    assert steps_of(tmp_path)[0]["skipped_updates"] == 1
    strict = json.loads((tmp_path / "grpo_metrics.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert strict["steps"][0]["loss"] is None  # NaN is written as null
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "saved_model")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters()))


def test_reference_model_is_frozen_and_never_gets_grad(tiny_model_dir, tmp_path, varied_rewards, monkeypatch):
    seen = {}
    real = train_grpo.policy_update

    def spy(run, *args, **kwargs):
        out = real(run, *args, **kwargs)
        seen["ref"] = run.ref_model
        seen["policy_params"] = [p.detach().clone() for p in run.policy.parameters()]
        return out

    monkeypatch.setattr(train_grpo, "policy_update", spy)
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "1")) == 0
    ref = seen["ref"]
    assert any(not torch.equal(a, b) for a, b in zip(seen["policy_params"], ref.parameters()))
    assert not ref.training and all(not p.requires_grad and p.grad is None for p in ref.parameters())
    from transformers import AutoModelForCausalLM
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), original.parameters()))


def test_beta_zero_loads_no_reference_model(tiny_model_dir, tmp_path, monkeypatch):
    seen = {}
    real = train_grpo.policy_update
    monkeypatch.setattr(train_grpo, "policy_update",
                        lambda run, *a, **k: seen.setdefault("ref", run.ref_model) or real(run, *a, **k))
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "1", "--beta", "0")) == 0
    assert seen["ref"] is None and steps_of(tmp_path)[0]["kl"] == 0


@pytest.fixture(scope="module")
def qwen_sampling_model_dir(tmp_path_factory):
    """A tiny model whose saved generation_config carries Qwen2.5-Instruct's sampling
    settings, plus two fields transformers 5 fills in whenever we leave them unset."""
    from conftest import save_tiny
    from transformers import GenerationConfig
    path = save_tiny(tmp_path_factory.mktemp("qwen_sampling"))
    shipped = GenerationConfig.from_pretrained(path)
    shipped.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, min_p=0.5,
                   suppress_tokens=list(range(100, 300)))
    shipped.save_pretrained(path)
    return path


def multinomial(logits, temperature, greedy=False):
    """How transformers' generate draws from softmax(logits / T)."""
    return torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1).squeeze(1)


def reference_decode(model, prompt_ids, steps: int, temperature: float, greedy: bool, draw=multinomial):
    """The sampling the loss assumes, written out: softmax(logits / T) in float32, or argmax.
    `draw` picks a token from the float32 distribution: generate's way, or ours (next_tokens,
    tested on its own for its frequencies)."""
    ids = prompt_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids).logits[:, -1].float()
            if greedy:
                nxt = logits.argmax(-1)
            else:
                nxt = draw(logits, temperature, False)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[:, prompt_ids.shape[1]:]


@pytest.mark.parametrize("sampler", ["groups", "static", "generate"])
@pytest.mark.parametrize("greedy, temperature", [(True, 1.0), (False, 1.0), (False, 1.2)])
def test_generation_is_exactly_what_the_loss_assumes_whatever_the_shipped_config(
        qwen_sampling_model_dir, greedy, temperature, sampler):
    model, tok = plumbing.load_model_and_tokenizer(qwen_sampling_model_dir, torch.float32)
    model.eval()
    prompt = train_grpo.prompts_for(tok, data.generate_arithmetic_problems(1, seed=5))[0]
    end_ids = engine.end_token_ids(tok, model)
    torch.manual_seed(7)
    roll = engine.generate_rollouts(model, tok, [prompt], 6, 12, temperature, end_ids, greedy=greedy,
                                        sampler=sampler)
    torch.manual_seed(7)
    prompt_ids = tok([prompt] * 6, return_tensors="pt", add_special_tokens=False)["input_ids"]
    draw = engine.next_tokens if sampler == "groups" else multinomial
    expected = reference_decode(model, prompt_ids, 12, temperature, greedy, draw)
    got = roll.input_ids[:, roll.prompt_len:]  # static pads prompts further left: compare completions only
    L = got.shape[1]
    assert torch.equal(got[roll.completion_mask], expected[:, :L][roll.completion_mask])
    assert greedy or len({t for t in roll.texts}) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.2])
def test_sampled_tokens_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.5, float("-inf"), 0.0, -3.0, 3.0]])
    torch.manual_seed(0)
    draws = torch.cat([engine.next_tokens(logits.expand(10_000, -1), temperature, False) for _ in range(10)])
    freq = torch.bincount(draws, minlength=8).double() / len(draws)
    p = torch.softmax(logits[0].double() / temperature, dim=-1)
    sigma = (p * (1 - p) / len(draws)).sqrt()
    assert freq[4] == 0                                                  # a -inf logit is never drawn
    assert ((freq - p).abs() <= 4 * sigma + 1e-12).all(), (freq, p)      # 100k draws: within 4 sigma
    assert torch.equal(engine.next_tokens(logits, temperature, True), torch.tensor([7]))


def test_a_uniform_inside_a_tiny_tokens_interval_draws_that_token(monkeypatch):
    """Token 1 holds p = 2e-8, between two tokens of ~0.5: its slice of the cumulative
    distribution is [0.5, 0.5 + 2e-8). Floats in [0.5, 1) are 6e-8 apart in float32, so a
    float32 sum or uniform could never land in it; float64 ones resolve it."""
    p = torch.tensor([0.5, 2e-8, 0.5 - 2e-8], dtype=torch.float64)
    logits = p.log().float()[None].expand(3, -1)
    fractions = torch.tensor([[0.5 - 1e-8], [0.5 + 1e-8], [0.5 + 3e-8]], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *shape, device=None, dtype=torch.float32: fractions.to(dtype))
    assert engine.next_tokens(logits, 1.0, False).tolist() == [0, 1, 2]


def prompts_of_different_lengths(tok, n=3):
    """Arithmetic prompts whose token counts differ, so left padding is exercised."""
    prompts = train_grpo.prompts_for(tok, data.generate_arithmetic_problems(40, seed=2))
    by_len = {len(tok(p, add_special_tokens=False)["input_ids"]): p for p in prompts}
    assert len(by_len) >= n
    return [by_len[k] for k in sorted(by_len)[:n]]


def test_group_sampler_matches_a_plain_loop_over_each_padded_prompt_and_prefills_once(
        qwen_sampling_model_dir, monkeypatch):
    model, tok = plumbing.load_model_and_tokenizer(qwen_sampling_model_dir, torch.float32)
    model.eval()
    prompts = prompts_of_different_lengths(tok)
    end_ids = engine.end_token_ids(tok, model)
    batch_sizes, seen = [], []
    hook = model.base_model.register_forward_hook(lambda m, args, kw, out: batch_sizes.append(
        (kw["input_ids"].shape)), with_kwargs=True)
    draw = engine.next_tokens
    monkeypatch.setattr(engine, "next_tokens", lambda logits, *a: seen.append(logits) or draw(logits, *a))
    torch.manual_seed(3)
    roll = engine.generate_rollouts(model, tok, prompts, 4, 10, 1.0, end_ids, sampler="groups")
    hook.remove()
    assert len(seen) == roll.input_ids.shape[1] - roll.prompt_len > 0  # one draw per completion column
    # each step draws from the logits a full rerun of the sequence so far gives
    position_ids = (roll.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=roll.input_ids, attention_mask=roll.attention_mask, position_ids=position_ids).logits
    P = roll.prompt_len
    for t, logits in enumerate(seen[:roll.input_ids.shape[1] - P]):
        torch.testing.assert_close(logits, full[:, P - 1 + t], rtol=1e-4, atol=1e-4)
    assert batch_sizes[0] == (3, roll.prompt_len)              # each prompt prefilled once, not 4 times
    assert all(s == (12, 1) for s in batch_sizes[1:])           # then one token per row per step
    # the same draws as the written-out loop on the left-padded prompts, each repeated 4 times
    torch.manual_seed(3)
    P = roll.prompt_len
    expected = reference_decode_masked(model, roll.input_ids[:, :P], roll.attention_mask[:, :P], 10, 1.0)
    got = roll.input_ids[:, P:]
    assert torch.equal(got[roll.completion_mask], expected[:, :got.shape[1]][roll.completion_mask])


@pytest.mark.parametrize("sampler", ["groups", "static", "generate"])
def test_the_loss_scores_each_sampled_token_as_the_sampler_drew_it(qwen_sampling_model_dir, monkeypatch, sampler):
    """On-policy, for every sampler, under left padding: the log-prob the loss's pass gives a
    sampled token is the one in the distribution the sampler drew it from."""
    model, tok = plumbing.load_model_and_tokenizer(qwen_sampling_model_dir, torch.float32)
    model.eval()
    prompts, G, T = prompts_of_different_lengths(tok), 4, 1.2
    drawn_from = []  # (N, V) log-probabilities, one per decode step
    if sampler == "groups":
        draw = engine.next_tokens
        monkeypatch.setattr(engine, "next_tokens", lambda logits, t, g: drawn_from.append(
            torch.log_softmax(logits.float() / t, -1)) or draw(logits, t, g))
    else:  # generate draws with torch.multinomial(softmax(processed logits))
        multinomial = torch.multinomial
        monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: drawn_from.append(
            probs.log()) or multinomial(probs, *a, **k))
    torch.manual_seed(4)
    roll = engine.generate_rollouts(model, tok, prompts, G, 10, T, engine.end_token_ids(tok, model),
                                        sampler=sampler)
    P, mask = roll.prompt_len, roll.completion_mask
    L = mask.shape[1]
    sampled = roll.input_ids[:, P:]
    expected = torch.stack(drawn_from[:L], 1).gather(-1, sampled[..., None]).squeeze(-1)  # (N, L)
    with torch.no_grad():
        scored, _ = train_grpo.completion_logprobs(model, roll, T, group_size=G)
    torch.testing.assert_close(scored[mask], expected[mask], rtol=0, atol=1e-4)


def reference_decode_masked(model, prompt_ids, prompt_mask, steps: int, temperature: float):
    """reference_decode for left-padded prompts: the whole sequence rerun at every step."""
    ids, mask = prompt_ids, prompt_mask
    with torch.no_grad():
        for _ in range(steps):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
            nxt = engine.next_tokens(logits, temperature, False)
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids[:, prompt_ids.shape[1]:]


def test_group_sampler_stops_at_the_step_the_last_row_ends(qwen_sampling_model_dir):
    model, tok = plumbing.load_model_and_tokenizer(qwen_sampling_model_dir, torch.float32)
    model.eval()
    prompt = train_grpo.prompts_for(tok, data.generate_arithmetic_problems(1, seed=5))[0]
    torch.manual_seed(0)
    free = engine.generate_rollouts(model, tok, [prompt], 4, 8, 1.0, [tok.eos_token_id], sampler="groups")
    # End on whatever token each row draws third: every row ends by step 3, so the loop does too.
    third = free.input_ids[:, free.prompt_len + 2].tolist()
    calls = []
    hook = model.base_model.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    roll = engine.generate_rollouts(model, tok, [prompt], 4, 8, 1.0, third, sampler="groups")
    hook.remove()
    assert roll.input_ids.shape[1] - roll.prompt_len <= 3 and len(calls) <= 3  # prefill + at most 2 decode steps
    assert not roll.truncated.any()


@pytest.mark.parametrize("sampler, compiled", [("static", False), ("groups", False), ("groups", True)])
def test_sampler_sees_weights_the_optimizer_changed_in_place(qwen_sampling_model_dir, sampler, compiled, monkeypatch):
    """A decode step compiled into CUDA graphs captures weight addresses, not values: the
    optimizer must update the weights in place and the sampler must see the new ones. Here
    the groups sampler's step is compiled (aot_eager: parameters are graph inputs, as under
    inductor); transformers' static generate runs eagerly on CPU."""
    torch._dynamo.reset()
    monkeypatch.setattr(engine, "COMPILE_BACKEND", "aot_eager")
    model, tok = plumbing.load_model_and_tokenizer(qwen_sampling_model_dir, torch.float32)
    prompt = train_grpo.prompts_for(tok, data.generate_arithmetic_problems(1, seed=5))[0]
    end_ids = engine.end_token_ids(tok, model)
    before = engine.generate_rollouts(model, tok, [prompt], 1, 12, 1.0, end_ids, greedy=True, sampler=sampler,
                                      compiled=compiled)
    # Teach it another answer, in place (Adam writes into the parameters it holds).
    seven = tok("7", add_special_tokens=False)["input_ids"][0]
    target = before._replace(input_ids=before.input_ids.clone())
    target.input_ids[:, before.prompt_len:] = seven
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        logp, _ = train_grpo.completion_logprobs(model, target, 1.0)
        optimizer.zero_grad()
        logp.sum().neg().backward()
        optimizer.step()
    after = engine.generate_rollouts(model, tok, [prompt], 1, 12, 1.0, end_ids, greedy=True, sampler=sampler,
                                     compiled=compiled)
    P = after.prompt_len
    expected = reference_decode(model, after.input_ids[:, :P], 12, 1.0, greedy=True)
    got = after.input_ids[:, P:]
    assert torch.equal(got[after.completion_mask], expected[:, :got.shape[1]][after.completion_mask])
    assert got[0, 0] == seven != before.input_ids[0, before.prompt_len]  # the steps changed the answer


def test_saved_model_carries_a_neutral_generation_config(qwen_sampling_model_dir, tmp_path):
    from transformers import GenerationConfig
    model, tok = plumbing.load_model_and_tokenizer(qwen_sampling_model_dir, torch.float32)
    model.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert (saved.top_k, saved.top_p, saved.repetition_penalty, saved.min_p) in [(None, None, None, None),
                                                                                 (50, 1.0, 1.0, None)]
    assert saved.eos_token_id == tok.eos_token_id


def test_sampling_ignores_the_models_own_generation_defaults(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.generation_config.top_k = 1  # as if greedy were baked in: our sampling must ignore it
    model.generation_config.repetition_penalty = 5.0
    torch.manual_seed(0)
    roll = engine.generate_rollouts(model, tok, ["hello"], 8, 6, 1.0, [tok.eos_token_id])
    assert len(set(roll.texts)) > 1


@pytest.fixture(scope="module")
def gpt2_dropout_model_dir(tmp_path_factory):
    """A tiny GPT-2-style model with GPT-2's dropout of 0.1 everywhere, and no chat template."""
    from tiny import make_tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = make_tiny_tokenizer(chat=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                       resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    path = tmp_path_factory.mktemp("gpt2_dropout")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_dropout_is_off_while_scoring_so_the_first_update_starts_at_kl_zero(gpt2_dropout_model_dir, tmp_path):
    cfg = parse_args(["--model", gpt2_dropout_model_dir, "--preset", "none", "--task", "arithmetic"])
    policy, ref, tok = train_grpo.load_policy_and_reference(cfg, "cpu", torch.float32)
    assert policy.training  # checkpointing needs training mode; dropout must not care
    prompts = train_grpo.prompts_for(tok, data.generate_arithmetic_problems(2, seed=1))
    roll = engine.generate_rollouts(policy, tok, prompts, 3, 8, 1.0, engine.end_token_ids(tok, policy))
    first, _ = train_grpo.completion_logprobs(policy, roll, 1.0)
    again, _ = train_grpo.completion_logprobs(policy, roll, 1.0)
    of_ref, _ = train_grpo.completion_logprobs(ref, roll, 1.0)
    assert torch.equal(first, again) and torch.equal(first, of_ref)
    # End to end: a random model earns no reward, so the only gradient is the KL's, which
    # is exactly 0 while policy and reference agree exactly (with or without checkpointing,
    # which decides whether the prompt runs once per group): no update moves anything.
    for checkpointing in ("true", "false"):
        out = tmp_path / checkpointing
        args = tiny_args(gpt2_dropout_model_dir, out, "--task", "arithmetic", "--num_iterations", "1",
                         "--num_inner_updates", "2", "--save_every", "0", "--gradient_checkpointing", checkpointing)
        assert train_grpo.main(args) == 0
        step = steps_of(out)[0]
        assert step["kl"] == 0 and step["clip_frac"] == 0 and step["reward_mean"] == 0


def test_checkpointing_is_switched_on_once_and_the_saved_config_keeps_use_cache(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    hooks, real = [], train_grpo.grpo_step

    def counting(run, step):
        out = real(run, step)
        emb = run.policy.get_input_embeddings()
        hooks.append(len(emb._forward_hooks) + len(emb._forward_pre_hooks))
        return out

    monkeypatch.setattr(train_grpo, "grpo_step", counting)
    args = tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "4", "--gradient_checkpointing", "true",
                     "--save_every", "0")
    assert train_grpo.main(args) == 0
    assert len(hooks) == 4 and len(set(hooks)) == 1 and hooks[0] <= 1
    assert json.loads((tmp_path / "saved_model" / "config.json").read_text())["use_cache"] is True


def test_sigterm_finishes_the_step_checkpoints_exits_0_and_resume_completes(tiny_model_dir, tmp_path):
    """What `timeout`, SLURM and Kubernetes send before a kill: a real process, a real signal."""
    import signal
    import time
    args = tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "200", "--save_every", "0", "--eval_every",
                     "1000", "--plot_every", "1000", "--sample_every", "1")
    proc = subprocess.Popen([sys.executable, "train_grpo.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "grpo_metrics.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and json.loads(metrics.read_text())["steps"]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out and "--resume" in out
    done = [s["step"] for s in steps_of(tmp_path)]
    assert done == list(range(1, len(done) + 1)) and len(done) < 200
    assert (tmp_path / "checkpoints" / f"step_{done[-1]:06d}" / "trainer_state.pt").is_file()
    assert not (tmp_path / "saved_model").exists()
    # resume to two steps past the stop
    end = str(len(done) + 2)
    resumed = subprocess.run([sys.executable, "train_grpo.py", *args, "--num_iterations", end, "--resume"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert [s["step"] for s in steps_of(tmp_path)] == list(range(1, int(end) + 1))
    assert (tmp_path / "saved_model").is_dir()


class RunsCode:
    """Unpickling this calls os.system: what a malicious trainer_state.pt could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("state", ["runs code", "old format"])
def test_a_checkpoint_holding_more_than_tensors_is_refused_before_it_is_used(tiny_model_dir, tmp_path, capsys, state):
    import numpy as np
    args = tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "1", "--save_every", "1")
    assert train_grpo.main(args) == 0
    ckpt = tmp_path / "checkpoints" / "step_000001" / "trainer_state.pt"
    marker = tmp_path / "code_ran"
    # "old format": what checkpoints held before, a numpy array among the RNG states
    bad = RunsCode(marker) if state == "runs code" else np.random.get_state()
    torch.save({"step": 1, "world": 1, "rng": {"numpy": bad}, "optimizer": {}, "metrics": {}}, ckpt)
    capsys.readouterr()  # the first run's progress bar
    assert train_grpo.main(args[:-2] + ["--num_iterations", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds more than tensors and plain values" in err[0] and "not loaded" in err[0]
    assert not marker.exists()


def test_a_torn_last_sample_line_does_not_stop_a_resume(tiny_model_dir, tmp_path):
    args = tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "2", "--save_every", "1")
    assert train_grpo.main(args) == 0
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step_000002")
    samples = tmp_path / "grpo_samples.jsonl"
    with open(samples, "a") as f:
        f.write('{"step": 2, "question": "what is 1 + ')  # killed mid-append
    assert train_grpo.main(args + ["--resume"]) == 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in rows] == [1] * 6 + [2] * 6


def right_only_on(operator, val, seen=None):
    """A stand-in for generate_rollouts: a model that answers every `operator` question of
    `val` right and nothing else; `seen` collects the batch size of each call."""
    def answers(model, tokenizer, prompts, *args, **kwargs):
        if seen is not None:
            seen.append(len(prompts))
        texts = []
        for prompt in prompts:
            problem = next(p for p in val if p["question"] in prompt)
            right = problem["question"].split()[3] == operator
            texts.append(f"<think>ok</think><answer>{problem['answer'] if right else 'x'}</answer>")
        return engine.Rollouts(None, None, None, 0, texts, None)
    return answers


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_sampled_completions_earn_partial_credit_only_when_asked(tiny_model_dir, monkeypatch, weight):
    def near_and_far(model, tokenizer, prompts, num_generations, *args, **kwargs):
        texts = []
        for prompt in prompts:
            problem = next(p for p in problems if p["question"] in prompt)
            answer = int(problem["answer"])
            texts += [f"<think>ok</think><answer>{a}</answer>" for a in (answer, answer + 1, answer + 9, "x")]
        return engine.Rollouts(None, None, None, 0, texts, None)

    model, tok = plumbing.load_model_and_tokenizer(tiny_model_dir, torch.float32)
    cfg = parse_args(["--model", tiny_model_dir, "--preset", "none", "--task", "arithmetic", "--num_generations", "4",
                      "--batch_size", "2", "--partial_credit", str(weight)])
    problems = train_grpo.train_problems(cfg, 1)
    monkeypatch.setattr(engine, "generate_rollouts", near_and_far)
    _, rollouts, grades = train_grpo.sample_and_grade(train_grpo.Run(cfg, model, tok, [tok.eos_token_id]), problems)
    for i, problem in enumerate(problems):
        near = max(0.0, 1 - 1 / (abs(int(problem["answer"])) + 1))
        far = max(0.0, 1 - 9 / (abs(int(problem["answer"])) + 1))
        assert [g.reward for g in grades[4 * i:4 * i + 4]] == pytest.approx([1.0, 0.2 + weight * near,
                                                                              0.2 + weight * far, 0.2])
        assert [g.correct for g in grades[4 * i:4 * i + 4]] == [True, False, False, False]


def test_partial_credit_must_leave_the_right_answer_best():
    for weight in ("0.8", "-0.1"):  # 0.8 + 0.2 for the tags would tie a near miss with the right answer
        with pytest.raises(plumbing.UsageError, match="--partial_credit must be at least 0 and below 0.8"):
            parse_args(["--partial_credit", weight])
    assert parse_args(["--partial_credit", "0.79"]).partial_credit == 0.79


def test_eval_reports_an_interval_and_accuracy_per_operator(tiny_model_dir, monkeypatch):
    model, tok = plumbing.load_model_and_tokenizer(tiny_model_dir, torch.float32)
    val = data.generate_arithmetic_problems(200, "val", unique=True)
    monkeypatch.setattr(engine, "generate_rollouts", right_only_on("+", val))
    cfg = parse_args(["--model", tiny_model_dir, "--preset", "none", "--task", "arithmetic", "--eval_batch_size", "16"])
    rec = train_grpo.evaluate(train_grpo.Run(cfg, model, tok, [tok.eos_token_id]), val)
    assert rec["n"] == 104 and rec["accuracy"] == pytest.approx(39 / 104)
    assert rec["by_category"] == {"*": {"n": 16, "accuracy": 0.0}, "+": {"n": 39, "accuracy": 1.0},
                                  "-": {"n": 49, "accuracy": 0.0}}
    lo, hi = rec["accuracy_ci95"]
    assert lo == pytest.approx(0.2880, abs=1e-4) and hi == pytest.approx(0.4709, abs=1e-4)  # Wilson, 39/104
    assert train_grpo.wilson_interval(0, 104)[0] == 0.0 and train_grpo.wilson_interval(104, 104)[1] == 1.0
    line = train_grpo.eval_line(dict(rec, step=0, seconds=1.0))
    assert "95% CI 0.29-0.47" in line and "+ 1.00" in line and "- 0.00" in line


@pytest.mark.parametrize("sampler, compiled, sizes", [
    ("static", False, [16] * 7),     # one batch shape: the last 8 are topped up to 16, so nothing compiles twice
    ("groups", True, [16] * 7),      # the same for our compiled decode step
    ("groups", False, [16] * 6 + [8]),  # eager: no copies to pay for
])
def test_static_eval_keeps_one_batch_shape_and_the_same_answers(tiny_model_dir, monkeypatch, sampler, compiled, sizes):
    model, tok = plumbing.load_model_and_tokenizer(tiny_model_dir, torch.float32)
    val = data.generate_arithmetic_problems(200, "val", unique=True)  # all 104
    seen = []
    monkeypatch.setattr(engine, "generate_rollouts", right_only_on("-", val, seen))
    cfg = parse_args(["--model", tiny_model_dir, "--preset", "none", "--task", "arithmetic",
                      "--eval_batch_size", "16", "--sampler", sampler])
    rec = train_grpo.evaluate(train_grpo.Run(cfg, model, tok, [tok.eos_token_id], compiled=compiled), val)
    assert seen == sizes
    assert rec["n"] == 104 and rec["by_category"]["-"] == {"n": 49, "accuracy": 1.0}
    assert rec["accuracy"] == pytest.approx(49 / 104)  # the copies are not counted


@pytest.mark.parametrize("bf16_units, bf16_speed, flag, expected", [
    (True, 300.0, "auto", torch.bfloat16),   # AMD EPYC with AVX512-BF16: bf16 3x faster
    (True, 50.0, "auto", None),              # Intel Xeon with the same flags: bf16 2x slower
    (False, None, "auto", None),             # emulated bf16: not even timed
    (False, None, "on", torch.bfloat16),
    (True, 300.0, "off", None),
])
def test_cpu_autocast_auto_is_decided_by_timing_a_matmul(monkeypatch, bf16_units, bf16_speed, flag, expected):
    timed = []

    def gflops(width, dtype, **kwargs):
        timed.append((width, dtype))
        return bf16_speed if dtype == torch.bfloat16 else 100.0

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: bf16_units)
    monkeypatch.setattr(precision, "matmul_gflops", gflops)
    cfg = parse_args(["--preset", "none", "--device", "cpu", "--cpu_autocast", flag])
    autocast, why = precision.choose_cpu_autocast(cfg, "cpu", torch.float32, 576)
    assert autocast == expected
    assert (len(timed) == 2 and "width 576" in why) == (flag == "auto" and bf16_units)
    assert why.startswith("bf16 autocast (" if expected is not None else "no autocast (")
    assert precision.choose_cpu_autocast(cfg, "cpu", torch.bfloat16, 576) == (None, "")  # bf16 weights already


def test_a_resumed_run_keeps_the_autocast_choice_it_started_with(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    speeds = {torch.float32: 100.0, torch.bfloat16: 300.0}
    monkeypatch.setattr(precision, "matmul_gflops", lambda width, dtype, **kw: speeds[dtype])
    args = tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "1", "--cpu_autocast", "auto")
    assert train_grpo.main(args) == 0
    assert json.loads((tmp_path / "grpo_metrics.json").read_text())["cpu_autocast"] is True
    speeds[torch.bfloat16] = 10.0  # the machine now measures differently
    assert train_grpo.main(args[:-2] + ["--num_iterations", "2", "--resume", "--cpu_autocast", "auto"]) == 0
    metrics = json.loads((tmp_path / "grpo_metrics.json").read_text())
    assert metrics["cpu_autocast"] is True and "as when the run started" in metrics["runtime"]["device"]


def test_matmul_timing_returns_a_throughput_for_both_dtypes():
    assert precision.matmul_gflops(64, torch.float32, rows=8) > 0
    assert precision.matmul_gflops(64, torch.bfloat16, rows=8) > 0


# --- CLI

def test_help_lists_every_field_with_its_default():
    out = subprocess.run([sys.executable, "train_grpo.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("learning_rate", "num_generations", "beta", "epsilon", "loss_type", "preset"):
        assert f"--{name}" in out.stdout
    assert "KL penalty weight" in out.stdout and "2e-06" in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["--lerning_rate", "1e-5"], "did you mean --learning_rate"),
    (["--batch_size", "-4"], "--batch_size must be at least 1"),
    (["--batch_size", "four"], "--batch_size expects int"),
    (["--task", "chess"], "--task must be one of countdown, arithmetic"),
    (["--learning_rate", "0"], "--learning_rate must be a positive number"),
    (["--num_generations", "1"], "at least 2"),
    (["--kl_cap", "-1"], "--kl_cap must be zero or more"),
    (["--preset", "gpu"], "--preset must be one of"),
    (["--resume", "maybe"], "expects bool"),
    (["stray"], "unexpected argument"),
])
def test_bad_flags_fail_with_one_line_and_exit_code_2(argv, message):
    out = subprocess.run([sys.executable, "train_grpo.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_flags_coerce_types_and_override_a_preset():
    cfg = parse_args(["--preset", "cpu", "--learning_rate", "1", "--num_iterations=7", "--resume"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.num_iterations == 7 and cfg.resume is True
    assert cfg.model == "smollm2" and cfg.task == "arithmetic"  # preset values
    cfg = parse_args(["--preset", "none"])
    assert cfg == GRPOConfig(preset="none")  # seed config
    assert (cfg.learning_rate, cfg.batch_size, cfg.num_generations, cfg.max_new_tokens, cfg.num_iterations,
            cfg.beta, cfg.epsilon, cfg.temperature) == (2e-6, 4, 16, 160, 1200, 0.01, 0.2, 1.2)


@pytest.mark.parametrize("preset", sorted(train_grpo.PRESETS))
def test_every_preset_is_a_valid_config_with_a_distinct_val_set(preset):
    cfg = parse_args(["--preset", preset])
    problems = train_grpo.eval_problems(cfg)  # raises if the split has fewer distinct problems
    assert len({data.problem_question(p) for p in problems}) == len(problems) == cfg.eval_size


def test_dr_grpo_turns_off_std_scaling_unless_asked():
    assert parse_args(["--preset", "none", "--loss_type", "dr_grpo"]).scale_rewards is False
    assert parse_args(["--preset", "none", "--loss_type", "dr_grpo", "--scale_rewards", "true"]).scale_rewards
    assert parse_args(["--preset", "none", "--loss_type", "dapo"]).scale_rewards is True
    assert "dr_grpo" in train_grpo.field_help()["scale_rewards"]


def test_without_cuda_the_default_run_is_the_cpu_preset(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_args([]).preset == "cpu"
    assert parse_args(["--preset", "none"]).model == "Qwen/Qwen2.5-1.5B-Instruct"


def test_unreachable_hub_fails_with_one_line_naming_alternatives(monkeypatch):
    asked = []
    monkeypatch.setattr(plumbing, "hub_reachable", lambda timeout=5.0: asked.append(timeout) or False)
    with pytest.raises(UsageError, match="cannot reach the Hugging Face hub.*--model smollm2"):
        plumbing.load_model_and_tokenizer("nobody-here/no-such-model-xyz", torch.float32)
    assert asked  # it asked once, quickly, instead of waiting on transformers' retries


def test_missing_model_paths_fail_clearly(tmp_path):
    with pytest.raises(UsageError, match="no GGUF file"):
        plumbing.resolve_model(str(tmp_path / "x.gguf"))
    with pytest.raises(UsageError, match="holds no model"):
        plumbing.resolve_model(str(tmp_path))
    with pytest.raises(UsageError, match="no model at"):
        plumbing.resolve_model("./not/here/at/all")


def test_an_output_dir_that_is_a_file_fails_with_one_line(tiny_model_dir, tmp_path):
    taken = tmp_path / "results.txt"
    taken.write_text("not a folder")
    out = subprocess.run([sys.executable, "train_grpo.py", *tiny_args(tiny_model_dir, taken)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"train_grpo.py: error: --output_dir {taken} is a file, "
                                                   f"not a folder; pass a folder (new or existing)")
    assert taken.read_text() == "not a folder"


def test_resume_without_a_checkpoint_fails_clearly(tiny_model_dir, tmp_path, capsys):
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err


# --- the bundled model

def test_one_real_step_on_smollm2(smollm2_gguf, tmp_path, varied_rewards):
    # 8 tokens cut off every completion, which the preset's overlong filtering would leave no loss
    args = ["--preset", "cpu", "--num_iterations", "1", "--batch_size", "1", "--num_generations", "3",
            "--max_new_tokens", "8", "--mask_truncated_completions", "false", "--eval_size", "2",
            "--eval_every", "1", "--save_every", "0", "--output_dir", str(tmp_path)]
    assert train_grpo.main(args) == 0
    step = steps_of(tmp_path)[0]
    assert step["completion_len"] > 0 and step["grad_norm"] > 0 and step["skipped_updates"] == 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved_model")
    assert model.config.model_type == "llama"


def test_mask_truncated_completions_gives_cut_off_rows_no_loss_and_no_gradient(tiny_model_dir, tmp_path):
    """Masking the truncated rows is the same update as giving them advantage 0 (with beta 0,
    their only other term): nothing of them reaches the gradient."""
    def started(*extra):
        args = tiny_args(tiny_model_dir, tmp_path, "--beta", "0", "--optimizer", "adamw", "--max_new_tokens", "6",
                         "--overwrite", *extra)
        return train_grpo.start_run(parse_args(args))[0]

    masked, reference = started("--mask_truncated_completions"), started()
    prompts = train_grpo.prompts_for(masked.tokenizer, train_grpo.train_problems(masked.cfg, 1))
    torch.manual_seed(0)
    rollouts = engine.generate_rollouts(masked.policy, masked.tokenizer, prompts, 3, 6, 1.2, masked.end_ids)
    truncated = rollouts.truncated.clone()
    truncated[0], truncated[-1] = True, False  # both kinds, whatever the tiny model wrote
    rollouts = rollouts._replace(truncated=truncated)
    advantages = torch.linspace(-1, 1, len(truncated))
    train_grpo.policy_update(masked, rollouts, advantages)
    train_grpo.policy_update(reference, rollouts, torch.where(truncated, torch.zeros_like(advantages), advantages))
    # Masked, the output head runs on fewer rows, and some CPUs' matmul kernels round by row
    # count (seen: 1.4e-6 on an AMD EPYC): 1% of one Adam step at lr 1e-3 is allowed, a leak is not.
    for a, b in zip(masked.policy.parameters(), reference.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    moved = [not torch.equal(a, b) for a, b in zip(masked.policy.parameters(), started().policy.parameters())]
    assert any(moved)  # the other rows did train


def test_a_micro_batch_of_cut_off_rows_only_adds_nothing(tiny_model_dir, tmp_path):
    """A part whose rows are all masked has no path to the weights: it must add a zero share,
    not fail in backward, and the update equals the one without those rows' advantages."""
    def started(*extra):
        args = tiny_args(tiny_model_dir, tmp_path, "--beta", "0", "--optimizer", "adamw", "--max_new_tokens", "6",
                         "--micro_batch_size", "3", "--overwrite", *extra)
        return train_grpo.start_run(parse_args(args))[0]

    masked, reference = started("--mask_truncated_completions"), started()
    prompts = train_grpo.prompts_for(masked.tokenizer, train_grpo.train_problems(masked.cfg, 1))
    torch.manual_seed(0)
    rollouts = engine.generate_rollouts(masked.policy, masked.tokenizer, prompts, 3, 6, 1.2, masked.end_ids)
    truncated = torch.zeros_like(rollouts.truncated)
    truncated[:3] = True  # the whole first micro-batch
    rollouts = rollouts._replace(truncated=truncated)
    advantages = torch.linspace(-1, 1, len(truncated))
    assert train_grpo.policy_update(masked, rollouts, advantages)["skipped_updates"] == 0
    train_grpo.policy_update(reference, rollouts, torch.where(truncated, torch.zeros_like(advantages), advantages))
    for a, b in zip(masked.policy.parameters(), reference.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_a_step_whose_completions_were_all_cut_off_skips_its_update_and_says_so(tiny_model_dir, tmp_path,
                                                                               monkeypatch, capsys):
    sample = train_grpo.sample_and_grade

    def all_cut_off(run, problems):
        prompts, rollouts, grades = sample(run, problems)
        return prompts, rollouts._replace(truncated=torch.ones_like(rollouts.truncated)), grades

    monkeypatch.setattr(train_grpo, "sample_and_grade", all_cut_off)
    args = tiny_args(tiny_model_dir, tmp_path, "--mask_truncated_completions", "--num_iterations", "1",
                     "--save_every", "0")
    assert train_grpo.main(args) == 0
    record = steps_of(tmp_path)[0]
    assert record["skipped_updates"] == 1 and record["loss"] is None and record["truncated_frac"] == 1.0
    assert record["tokens_trained"] == 0
    assert "every completion trained on was cut off at --max_new_tokens" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM
    trained, original = (AutoModelForCausalLM.from_pretrained(d) for d in (tmp_path / "saved_model", tiny_model_dir))
    for a, b in zip(trained.parameters(), original.parameters()):
        assert torch.equal(a, b)


# --- dynamic sampling (DAPO): train only on groups with a signal

def spread_only_for_targets_divisible_by_3(monkeypatch):
    """Groups of a countdown problem whose target is a multiple of 3 get rewards that differ
    (a checksum of the text); the other groups all get 0, so they carry no signal."""
    def by_target(completion, problem, no_template=False):
        reward = (sum(map(ord, completion)) % 3) / 2 if problem["target"] % 3 == 0 else 0.0
        return train_grpo.Grade(reward, reward == 1.0, False, False)

    monkeypatch.setattr(train_grpo, "grade", by_target)


def test_dynamic_sampling_trains_only_on_groups_whose_rewards_differ(tiny_model_dir, tmp_path, monkeypatch):
    spread_only_for_targets_divisible_by_3(monkeypatch)
    seen, calls = [], []
    update, sample = train_grpo.policy_update, train_grpo.sample_and_grade
    monkeypatch.setattr(train_grpo, "policy_update", lambda run, rollouts, adv: seen.append((rollouts, adv))
                        or update(run, rollouts, adv))
    monkeypatch.setattr(train_grpo, "sample_and_grade", lambda run, problems: calls.append(len(problems))
                        or sample(run, problems))
    args = tiny_args(tiny_model_dir, tmp_path, "--dynamic_sampling", "--max_sampling_rounds", "4",
                     "--num_iterations", "3", "--batch_size", "3", "--save_every", "0")
    assert train_grpo.main(args) == 0
    cfg = parse_args(args)
    rows = [json.loads(line) for line in (tmp_path / "grpo_samples.jsonl").read_text().splitlines()]
    lacking, expected_calls = 0, []
    for step, record, (rollouts, advantages) in zip((1, 2, 3), steps_of(tmp_path), seen):
        rewards = torch.tensor([r["reward"] for r in rows if r["step"] == step])  # every sampled group, in order
        spread = train_grpo.has_spread(rewards, 3).tolist()
        lacking += spread.count(False)
        rounds, take = 0, 1  # one round, then the rounds the share with spread so far says are needed
        while True:
            expected_calls.append(3 * take)
            rounds += take
            if sum(spread[:3 * rounds]) >= 3 or rounds == 4:
                break
            take = train_grpo.rounds_to_sample_next(sum(spread[:3 * rounds]), 3 * rounds, 3, 4 - rounds)
        assert record["groups_sampled"] == 3 * rounds == len(spread)  # it stopped once 3 groups had spread
        assert record["groups_trained"] == min(3, sum(spread)) == len(rollouts.texts) // 3
        assert record["tokens_trained"] == int(rollouts.completion_mask.sum())
        kept = [g for g, has in enumerate(spread) if has][:3]
        drawn = [p for r in range(rounds) for p in train_grpo.train_problems(cfg, step, sampling_round=r)]
        trained = torch.tensor([train_grpo.grade(t, drawn[kept[i // 3]]).reward for i, t in enumerate(rollouts.texts)])
        assert train_grpo.has_spread(trained, 3).all()  # no trained group has zero spread
        assert advantages.view(-1, 3).abs().sum(1).gt(0).all()
    assert lacking > 0  # some groups lacked spread, so the filter had something to do
    assert calls == expected_calls and max(calls) > 3  # and several rounds were sampled in one call
    # round 0 is the plain step's draw, so a run that needs one round draws what it always drew
    assert train_grpo.train_problems(cfg, 1, sampling_round=0) == train_grpo.train_problems(cfg, 1)


@pytest.mark.parametrize("have, sampled, left, rounds", [
    (2, 3, 2, 1),   # 1 group missing, 2 in 3 have spread: one more round of 3 should do
    (1, 3, 2, 2),   # 2 missing at 1 in 3: 6 prompts, two rounds at once
    (1, 3, 1, 1),   # ... but never more than the rounds left
    (0, 3, 2, 2),   # none yet: every round left
    (1, 6, 5, 4),   # 2 missing at 1 in 6: 12 prompts
])
def test_dynamic_sampling_samples_the_rounds_it_expects_to_need_at_once(have, sampled, left, rounds):
    assert train_grpo.rounds_to_sample_next(have, sampled, 3, left) == rounds


def test_a_step_whose_groups_all_lack_spread_skips_its_update_and_says_so(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setattr(train_grpo, "grade", lambda completion, problem, no_template=False:
                        train_grpo.Grade(0.1, False, True, False))
    args = tiny_args(tiny_model_dir, tmp_path, "--dynamic_sampling", "--max_sampling_rounds", "2",
                     "--num_iterations", "1", "--save_every", "0")
    assert train_grpo.main(args) == 0
    record = steps_of(tmp_path)[0]
    assert record["groups_sampled"] == 4 and record["groups_trained"] == 0
    assert record["skipped_updates"] == 1 and record["loss"] is None and record["kl"] is None
    assert "none of the 4 groups sampled had rewards that differ" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM
    trained, original = (AutoModelForCausalLM.from_pretrained(d) for d in (tmp_path / "saved_model", tiny_model_dir))
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters()))


def grade_rigged_by_answer_parity(monkeypatch):
    """Arithmetic groups of an even answer are all right (no spread, nothing to guide); the
    others are all wrong, so only a worked solution can give them spread."""
    def rigged(completion, problem, no_template=False):
        right = int(problem["answer"]) % 2 == 0 or completion == data.worked_solution(problem)
        return train_grpo.Grade(float(right), right, False, False)

    monkeypatch.setattr(train_grpo, "grade", rigged)


@pytest.mark.parametrize("worked", [True, False])
def test_worked_solutions_stand_in_for_a_completion_of_each_group_with_no_right_answer(
        tiny_model_dir, tmp_path, monkeypatch, worked):
    from transformers import AutoTokenizer
    grade_rigged_by_answer_parity(monkeypatch)
    seen, update = [], train_grpo.policy_update
    monkeypatch.setattr(train_grpo, "policy_update", lambda run, rollouts, adv: seen.append((rollouts, adv))
                        or update(run, rollouts, adv))
    args = tiny_args(tiny_model_dir, tmp_path, "--task", "arithmetic", "--max_new_tokens", "40", "--dynamic_sampling",
                     "--worked_solutions", str(worked).lower(), "--save_every", "0")
    assert train_grpo.main(args) == 0
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in (tmp_path / "grpo_samples.jsonl").read_text().splitlines()]
    guided_total = 0
    for step, record, (rollouts, advantages) in zip((1, 2), steps_of(tmp_path), seen):
        step_rows = [r for r in rows if r["step"] == step]
        groups = [step_rows[i:i + 3] for i in range(0, len(step_rows), 3)]
        problems = [data.parse_question(g[0]["question"]) for g in groups]
        unsolved = [int(p["answer"]) % 2 == 1 for p in problems]
        # the policy's own samples, not the solutions, make the logged accuracy
        assert record["accuracy"] == pytest.approx(unsolved.count(False) / len(groups))
        if not worked:  # no group has spread: nothing to train on
            assert not any(r["worked_solution"] for r in step_rows) and record["groups_trained"] == 0
            continue
        for g, problem, alone in zip(groups, problems, unsolved):
            assert [r["worked_solution"] for r in g] == [False, False, alone]
            if alone:  # the last completion is the solution, right, and the one the group reinforces
                assert g[-1]["completion"] == data.worked_solution(problem) and g[-1]["correct"]
                assert g[-1]["advantage"] > 0 > g[0]["advantage"]
        # dynamic sampling counts a guided group as one with spread, and trains on those
        assert record["groups_trained"] == record["groups_guided"] == 2 == len(rollouts.texts) // 3
        guided_total += record["groups_guided"]
        kept = [p for p, alone in zip(problems, unsolved) if alone][:2]
        for k, problem in enumerate(kept):  # the update reads the solution's tokens, then the end token
            row = 3 * k + 2
            ids = rollouts.input_ids[row, rollouts.prompt_len:][rollouts.completion_mask[row]].tolist()
            assert ids == tok(data.worked_solution(problem), add_special_tokens=False).input_ids + [tok.eos_token_id]
            assert not rollouts.truncated[row] and advantages[row] > 0
    assert guided_total == (4 if worked else 0)


def test_a_worked_solution_longer_than_the_completion_budget_is_not_used(tiny_model_dir, tmp_path, monkeypatch):
    grade_rigged_by_answer_parity(monkeypatch)
    args = tiny_args(tiny_model_dir, tmp_path, "--task", "arithmetic", "--max_new_tokens", "4", "--worked_solutions",
                     "--save_every", "0")
    assert train_grpo.main(args) == 0
    assert [r["groups_guided"] for r in steps_of(tmp_path)] == [0, 0]


def test_rollouts_of_different_paddings_concatenate_without_moving_a_log_prob(tiny_model_dir, tmp_path):
    run = train_grpo.start_run(parse_args(tiny_args(tiny_model_dir, tmp_path)))[0]
    questions = ["what is 1 + 2?", "Using the numbers [10, 9, 8], create an expression that equals 98. Be quick."]
    torch.manual_seed(0)
    parts = [engine.generate_rollouts(run.policy, run.tokenizer, [data.build_prompt(run.tokenizer, q)], 2, n,
                                      1.2, run.end_ids) for q, n in zip(questions, (8, 3))]
    assert parts[0].prompt_len != parts[1].prompt_len
    merged = engine.concat_rollouts(parts, run.tokenizer.pad_token_id)
    assert merged.texts == parts[0].texts + parts[1].texts and merged.completion_mask.sum() == sum(
        p.completion_mask.sum() for p in parts)
    with torch.no_grad():
        whole = train_grpo.completion_logprobs(run.policy, merged, 1.2, group_size=2)[0]
        for i, part in enumerate(parts):
            alone = train_grpo.completion_logprobs(run.policy, part, 1.2, group_size=2)[0]
            rows = merged.completion_mask[2 * i:2 * i + 2]
            torch.testing.assert_close(whole[2 * i:2 * i + 2][rows], alone[part.completion_mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra, passes", [((), 1 + 1 + 3), (("--beta", "0"), 1 + 3),
                                           (("--num_inner_updates", "2"), 1 + 1 + 1 + 2 * 3)])
def test_a_step_counts_its_model_flops_and_utilisation(tiny_model_dir, tmp_path, varied_rewards, extra, passes):
    """Sampling, the reference and old-policy forwards, and each update's forward and
    backward: 2 FLOPs per matmul weight per real token for a forward, 6 for forward + backward."""
    run = train_grpo.start_run(parse_args(tiny_args(tiny_model_dir, tmp_path, *extra)))[0]
    record, _ = train_grpo.grpo_step(run, 1)
    linear = sum(m.weight.numel() for m in run.policy.modules() if isinstance(m, torch.nn.Linear))
    tokens = 2 * record["prompt_len"] + 2 * 3 * record["completion_len"]  # 2 prompts once each, 6 completions
    assert record["flops"] == pytest.approx(2 * linear * tokens * passes)
    assert record["mfu"] == pytest.approx(record["flops"] / record["step_seconds"] / run.peak_flops)
    assert run.peak_flops > 0 and f"(mfu {100 * record['mfu']:.1f}%)" in train_grpo.progress_line(record, 2, 0.0)


def test_checkpointing_keeps_prompt_sharing_with_the_same_log_probs_and_gradients(tiny_model_dir, tmp_path):
    """Under gradient checkpointing each group's prompt still runs once: every decoder layer
    runs twice (forward, then the recompute in backward), and log-probs and gradients equal
    the full-sequence pass's, in which every row runs its own copy of the prompt."""
    cfg = parse_args(tiny_args(tiny_model_dir, tmp_path, "--gradient_checkpointing", "true"))
    policy, _, tok = train_grpo.load_policy_and_reference(cfg, "cpu", torch.float32)
    prompts = [data.build_prompt(tok, q) for q in ("what is 1 + 2?", "what is 12 - 20? Show your work.")]
    torch.manual_seed(0)
    roll = engine.generate_rollouts(policy, tok, prompts, 3, 8, 1.2, engine.end_token_ids(tok, policy))
    assert policy.training and engine.prompt_group_size(policy, 6, 3) == 3
    layer = policy.model.layers[0]
    calls = []
    layer.mlp.register_forward_pre_hook(lambda module, args: calls.append(1))

    def logprobs_and_grads(group):
        policy.zero_grad(set_to_none=True)
        calls.clear()
        logp, _ = train_grpo.completion_logprobs(policy, roll, 1.2, group_size=group)
        (logp * roll.completion_mask).sum().backward()
        return logp.detach(), [p.grad.clone() for p in policy.parameters()], len(calls)

    shared, shared_grads, shared_calls = logprobs_and_grads(3)
    full, full_grads, full_calls = logprobs_and_grads(1)
    assert (shared_calls, full_calls) == (4, 2)  # prompt and completions, each run and recomputed; full: once, twice
    mask = roll.completion_mask
    torch.testing.assert_close(shared[mask], full[mask], rtol=0, atol=1e-5)
    for a, b in zip(shared_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampler", ["groups", "generate"])
def test_non_finite_logits_end_the_run_with_one_line_and_the_state_kept_apart(tiny_model_dir, tmp_path, monkeypatch,
                                                                              capsys, sampler):
    """Weights that give NaN logits stop the run after a save, with one sentence, never a
    device-side assert from torch.multinomial; --resume still picks the last good checkpoint."""
    real = train_grpo.grpo_step

    def poisoned(run, step):
        if step == 2:  # as if step 1's update had overflowed
            with torch.no_grad():
                run.policy.model.norm.weight.fill_(float("nan"))
        return real(run, step)

    monkeypatch.setattr(train_grpo, "grpo_step", poisoned)
    seen = []
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, real=torch.multinomial, **k:
                        seen.append(bool(torch.isfinite(probs).all())) or real(probs, *a, **k))
    args = tiny_args(tiny_model_dir, tmp_path, "--num_iterations", "3", "--sampler", sampler)
    assert train_grpo.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "logits hold NaN or infinity: the weights have diverged" in err and "--resume" in err
    assert (tmp_path / "checkpoints" / "diverged" / "step_000001" / "trainer_state.pt").is_file()
    assert plumbing.latest_checkpoint(tmp_path / "checkpoints").name == "step_000001"
    assert all(seen) and (seen or sampler == "groups")  # generate's sampler never saw a NaN probability
    assert len(steps_of(tmp_path)) == 1
