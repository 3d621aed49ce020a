"""The compiled sampler: the same draws as the eager one, the weights of the moment, and
a fixed number of graphs once warmed up (what CUDA graphs need not to re-record).

    python -m pytest tests/test_engine.py -v

torch.compile runs here on CPU: with inductor where the generated code is the question,
with a counting backend (the traced graph run as is) where only the number of graphs is.
"""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import data
import engine
import plumbing
import precision
import train_grpo
from train_grpo import parse_args


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Each test compiles from nothing: dynamo keeps graphs per code object, across models."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend(monkeypatch, backend="eager"):
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    monkeypatch.setattr(engine, "COMPILE_BACKEND", counter)
    return counter


def load(model_dir, dtype=torch.float32):
    model, tok = plumbing.load_model_and_tokenizer(model_dir, dtype)
    prompts = train_grpo.prompts_for(tok, data.generate_arithmetic_problems(3, seed=2))
    return model.eval(), tok, prompts, engine.end_token_ids(tok, model)


def sample(model, tok, prompts, end_ids, compiled, seed=3, greedy=False, G=4):
    torch.manual_seed(seed)
    return engine.generate_rollouts(model, tok, prompts, G, 12, 1.2, end_ids, greedy=greedy, compiled=compiled)


def test_compiled_sampler_draws_exactly_what_the_eager_one_draws(tiny_model_dir):
    model, tok, prompts, end_ids = load(tiny_model_dir)  # inductor: real generated code
    for greedy in (False, True):
        eager = sample(model, tok, prompts, end_ids, compiled=False, greedy=greedy)
        compiled = sample(model, tok, prompts, end_ids, compiled=True, greedy=greedy)
        assert torch.equal(compiled.input_ids, eager.input_ids)
        assert torch.equal(compiled.completion_mask, eager.completion_mask)
        assert greedy or len(set(eager.texts)) > 1


def test_compiled_sampler_reads_the_weights_after_updates_and_after_the_master_swap(
        tiny_model_dir, monkeypatch, varied_rewards):
    """bf16 weights with float32 masters, as on a GPU: the optimizer writes the model's
    weights in place, and saving swaps the masters in and out. A compiled step that kept
    the old weights, or a stale copy, would draw other tokens than the eager step."""
    counter = counting_backend(monkeypatch, "aot_eager")  # functionalised: in-place cache writes are real
    cfg = parse_args(["--model", tiny_model_dir, "--preset", "none", "--task", "arithmetic", "--dtype", "bfloat16",
                      "--batch_size", "3", "--num_generations", "4", "--max_new_tokens", "12", "--learning_rate",
                      "1e-2", "--optimizer", "adamw", "--beta", "0", "--compile", "on", "--device", "cpu",
                      "--gradient_checkpointing", "false"])
    policy, _, tok = train_grpo.load_policy_and_reference(cfg, "cpu", torch.bfloat16)
    run = train_grpo.Run(cfg, policy, tok, engine.end_token_ids(tok, policy),
                         optimizer=precision.make_optimizer(cfg, policy), peak_flops=1e12, compiled=True)
    assert isinstance(run.optimizer, precision.MasterWeights)
    prompts = train_grpo.prompts_for(tok, data.generate_arithmetic_problems(3, seed=2))
    before = sample(policy, tok, prompts, run.end_ids, compiled=True)
    for step in (1, 2):
        train_grpo.grpo_step(run, step)
    with precision.masters_in_model(run.optimizer):
        pass  # what saving a checkpoint does to the model's weights
    compiled = sample(policy, tok, prompts, run.end_ids, compiled=True)
    eager = sample(policy, tok, prompts, run.end_ids, compiled=False)
    assert torch.equal(compiled.input_ids, eager.input_ids)
    assert not torch.equal(compiled.input_ids, before.input_ids)  # the updates changed what it draws
    assert counter.frame_count == 1  # and not by compiling again


def test_compiled_graphs_stay_the_same_over_training_steps_and_evals(tiny_model_dir, tmp_path, monkeypatch, varied_rewards):
    """One graph per cache shape (a train step's rows, an eval batch's rows), recorded the
    first time each is met; then none, step after step."""
    counter = counting_backend(monkeypatch)
    counts, allocations = [], []
    real_init = engine.StaticKV.__init__
    monkeypatch.setattr(engine.StaticKV, "__init__", lambda self, *a: allocations.append(a[:2]) or real_init(self, *a))
    for name in ("grpo_step", "evaluate"):
        real = getattr(train_grpo, name)
        monkeypatch.setattr(train_grpo, name, lambda *a, real=real, name=name: (
            result := real(*a), counts.append((name, counter.frame_count)))[0])
    argv = ["--model", tiny_model_dir, "--preset", "none", "--task", "arithmetic", "--num_iterations", "6",
            "--batch_size", "2", "--num_generations", "3", "--max_new_tokens", "8", "--eval_size", "104",
            "--eval_batch_size", "48", "--eval_every", "2", "--save_every", "0", "--compile", "on",
            "--output_dir", str(tmp_path), "--cpu_autocast", "off", "--cpu_linear", "torch"]
    assert train_grpo.main(argv) == 0
    assert [n for n, _ in counts] == ["evaluate"] + ["grpo_step", "grpo_step", "evaluate"] * 3
    warm = counts[1][1]  # after the first eval and the first step
    assert warm == 2 and all(c == warm for _, c in counts[1:]), counts
    # and the caches those graphs write were allocated once each: on CUDA a new address re-records a graph
    assert sorted(rows for rows, _ in allocations) == [6, 48], allocations


def test_sampler_asking_whether_rows_ended_every_k_tokens_changes_no_completion(tiny_model_dir, monkeypatch):
    model, tok, prompts, end_ids = load(tiny_model_dir)
    free = sample(model, tok, prompts, end_ids, compiled=False)
    end_ids = [int(free.input_ids[0, free.prompt_len + 2])]  # a token rows draw: they end at different steps
    every_token = sample(model, tok, prompts, end_ids, compiled=False)
    monkeypatch.setattr(engine, "sync_interval", lambda device: 5)  # as on CUDA, where asking stalls the GPU
    every_5 = sample(model, tok, prompts, end_ids, compiled=False)
    assert every_token.completion_mask.sum(1).unique().numel() > 1 and not every_token.truncated.all()
    assert torch.equal(every_5.input_ids, every_token.input_ids) and every_5.texts == every_token.texts
