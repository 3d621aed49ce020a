"""--lora_rank: only adapters train, the base is the reference, resume is exact, and
saved_model/ is the merged model.

    python -m pytest tests/test_lora.py -v
"""

import sys

import pytest
import torch

import plumbing
import precision
import train_grpo
from train_grpo import parse_args

from test_train import steps_of, tiny_args

pytest.importorskip("peft")


def lora_args(model_dir, out, *extra):
    return tiny_args(model_dir, out, "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
                     "--optimizer", "adamw", *extra)


def started(model_dir, out, *extra):
    run, _, _ = train_grpo.start_run(parse_args(lora_args(model_dir, out, *extra)))
    return run


def test_only_the_adapters_change_and_the_base_is_the_reference(tiny_model_dir, tmp_path, varied_rewards):
    run = started(tiny_model_dir, tmp_path)
    assert run.ref_model is None  # no second copy of the model
    before = {name: p.detach().clone() for name, p in run.policy.named_parameters()}
    trainable = {name for name, p in run.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # all-linear: every linear layer of the decoder, none of the output head
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}
    first, _ = train_grpo.grpo_step(run, 1)
    assert first["kl"] == 0.0 and first["kl_max"] == 0.0  # B = 0: the policy starts as its reference
    assert first["grad_norm"] > 0
    second, _ = train_grpo.grpo_step(run, 2)
    assert second["kl"] > 0  # the adapters moved the policy away from the base, which stayed put
    changed = {name for name, p in run.policy.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed <= trainable  # not one base weight moved
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    assert all(p.requires_grad for n, p in run.policy.named_parameters() if n in trainable)  # re-enabled


def test_adapters_train_in_float32_over_a_bf16_base_without_master_weights(tiny_model_dir, tmp_path):
    run, metrics, _ = train_grpo.start_run(parse_args(lora_args(tiny_model_dir, tmp_path, "--dtype", "bfloat16")))
    assert "bfloat16 frozen weights, float32 LoRA adapters" in metrics["runtime"]["device"]
    dtypes = {p.dtype for p in run.policy.parameters() if p.requires_grad}
    frozen = {p.dtype for p in run.policy.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    assert isinstance(run.optimizer, torch.optim.AdamW)  # nothing to master: the adapters are float32


def test_sampling_through_merged_weights_draws_the_same_tokens_and_leaves_the_base_untouched(tiny_model_dir,
                                                                                              tmp_path):
    import engine

    run = started(tiny_model_dir, tmp_path)
    with torch.no_grad():
        for name, p in run.policy.named_parameters():
            if ".lora_B." in name:  # as if trained: B = 0 would make the merge a no-op
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    before = {name: p.detach().clone() for name, p in run.policy.named_parameters()}
    prompts = train_grpo.prompts_for(run.tokenizer, train_grpo.train_problems(run.cfg, 1))

    def draw():
        torch.manual_seed(0)
        return engine.generate_rollouts(run.policy, run.tokenizer, prompts, 3, 8, 1.2, run.end_ids).input_ids

    unmerged = draw()
    with plumbing.lora_merged(run.policy):
        layer = plumbing.lora_layers(run.policy)[0]
        assert layer.disable_adapters and not torch.equal(layer.get_base_layer().weight, before[
            next(n for n, m in run.policy.named_modules() if m is layer) + ".base_layer.weight"])
        merged = draw()
    assert torch.equal(merged, unmerged)
    for name, p in run.policy.named_parameters():
        assert torch.equal(p.detach(), before[name]), name  # W put back exactly, not W + BA - BA
    assert not any(m.disable_adapters for m in plumbing.lora_layers(run.policy))
    assert {n for n, p in run.policy.named_parameters() if p.requires_grad} == {n for n in before if ".lora_" in n}


def test_a_lora_resume_continues_exactly(tiny_model_dir, tmp_path, varied_rewards):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_grpo.main(lora_args(tiny_model_dir, straight, "--num_iterations", "4")) == 0
    assert train_grpo.main(lora_args(tiny_model_dir, split, "--num_iterations", "2")) == 0
    saved = sorted(p.name for p in (split / "checkpoints" / "step_000002").iterdir())
    assert saved == ["adapters.safetensors", "trainer_state.pt"]  # the base is --model: not copied
    assert train_grpo.main(lora_args(tiny_model_dir, split, "--num_iterations", "4", "--resume")) == 0
    a, b = steps_of(straight), steps_of(split)
    assert [s["step"] for s in b] == [1, 2, 3, 4]
    for i in (2, 3):
        for key in ("reward_mean", "loss", "kl", "grad_norm", "completion_len"):
            assert b[i][key] == pytest.approx(a[i][key], rel=1e-4, abs=1e-6), (i + 1, key)
    # a LoRA checkpoint resumed as full fine-tuning is refused in one sentence
    assert train_grpo.main(tiny_args(tiny_model_dir, split, "--num_iterations", "5", "--resume")) == 2


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's, not ours
def test_saved_model_is_the_merged_model_and_equals_base_plus_adapter(tiny_model_dir, tmp_path, varied_rewards):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert train_grpo.main(lora_args(tiny_model_dir, tmp_path, "--num_iterations", "2")) == 0
    saved = tmp_path / "saved_model"
    merged = AutoModelForCausalLM.from_pretrained(saved)  # a plain model: no peft needed to load it
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             saved / "adapter")
    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        untrained = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - untrained).abs().max() > 1e-3  # the adapter learned something, and the merge kept it


def test_bad_lora_flags_are_one_sentence(tiny_model_dir, tmp_path, capsys, monkeypatch):
    assert train_grpo.main(lora_args(tiny_model_dir, tmp_path / "a", "--lora_target_modules", "nonexistent")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_grpo.py: error: --lora_target_modules nonexistent:") and "\n" not in err
    assert err.endswith("name linear layers of this model, or pass all-linear")
    monkeypatch.setitem(sys.modules, "peft", None)
    assert train_grpo.main(lora_args(tiny_model_dir, tmp_path / "b")) == 2
    assert capsys.readouterr().err.strip() == ("train_grpo.py: error: --lora_rank needs the peft package: pip install "
                                               "peft (or pip install -r requirements-extras.txt)")


def test_without_lora_nothing_changes(tiny_model_dir, tmp_path):
    run, _, _ = train_grpo.start_run(parse_args(tiny_args(tiny_model_dir, tmp_path, "--optimizer", "adamw")))
    assert run.ref_model is not None and not plumbing.is_lora(run.policy)
    assert all(p.requires_grad for p in run.policy.parameters())
    assert not isinstance(run.optimizer, precision.MasterWeights)
