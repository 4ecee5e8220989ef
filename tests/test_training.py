"""The pretraining system end to end on the real corpus: trainer, checkpoints, resume, CLI errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raptr.training.build import build_trainer, prepare_data
from raptr.training.checkpoint import checkpoint_dirs, load_state, load_weights, save_checkpoint
from raptr.training.config import load_config
from conftest import AUSTEN_DATA, tiny

TINY = tiny("method.raptr.schedule=3-4")


def tiny_config(tmp_path, data_cache, *extra, preset="bert-tiny-raptr"):
    overrides = TINY + [f"data.cache_dir={data_cache}", *AUSTEN_DATA, f"train.out_dir={tmp_path}/run"] + list(extra)
    return load_config(preset, overrides)


def raptr_cli(*args, cwd=None, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "raptr", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, **kw)


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_trainer_runs_raptr_and_logs_flops_and_boundaries(tmp_path, data_cache):
    cfg = tiny_config(tmp_path, data_cache, "train.steps=16", "train.eval_every=8", "train.checkpoint_every=8",
                      "model.n_layers=6", "method.raptr.schedule=3-4-6")
    trainer = build_trainer(cfg, progress=False)
    summary = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert {r["stage"] for r in train} == {0, 1, 2}
    assert all(r["layers_run"] == 6 for r in train if r["stage"] == 2)  # last stage: full model
    assert any(r["layers_run"] < 6 for r in train if r["stage"] == 0)
    boundary_steps = {r["step"] for r in evals if r.get("boundary")}
    assert boundary_steps == set(trainer.method.stage_boundaries()) == {3, 8}  # the default Prop-1 lengths: 16 x 1/6, 3/6
    assert summary["relative_flops"] < 1.0 and summary["final_val_loss"] == evals[-1]["val_loss"]
    assert (tmp_path / "run" / "summary.json").is_file() and any((tmp_path / "run" / "tb").iterdir())
    assert checkpoint_dirs(tmp_path / "run" / "checkpoints")[-1].name == "step_0000016"


def test_standard_training_learns_on_real_text(tmp_path, data_cache):
    cfg = tiny_config(tmp_path, data_cache, "train.steps=40", "train.eval_every=40", "method.name=standard",
                      "optim.lr=0.003", "objective.name=causal", "data.tokenizer=bpe")
    summary = build_trainer(cfg, progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r for r in rows if r["kind"] == "eval")["val_loss"]
    assert summary["final_val_loss"] < first_eval - 0.5  # ~ln(1024)=6.9 at init
    assert summary["relative_flops"] == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama", "opt", "gpt_neox"])
def test_trainer_trains_each_hf_architecture(tmp_path, data_cache, arch):
    objective = "mlm" if arch in ("bert", "roberta") else "causal"
    cfg = tiny_config(tmp_path, data_cache, "model.family=hf", f"model.hf_type={arch}", f"objective.name={objective}",
                      "train.steps=6", "train.eval_every=6", "method.raptr.schedule=3-4",
                      "data.tokenizer=" + ("wordpiece" if objective == "mlm" else "bpe"))
    trainer = build_trainer(cfg, progress=False)
    summary = trainer.fit()
    assert summary["steps"] == 6 and summary["final_val_loss"] < 8
    assert 0.5 < summary["relative_flops"] < 1.0


def test_ul2_trains_with_prefix_lm(tmp_path, data_cache):
    cfg = load_config("ul2-tiny-raptr", TINY + [f"data.cache_dir={data_cache}", *AUSTEN_DATA, "data.seq_len=64",
                                                f"train.out_dir={tmp_path}/run", "train.steps=6", "train.eval_every=6",
                                                "method.raptr.schedule=3-4"])
    summary = build_trainer(cfg, progress=False).fit()
    assert summary["steps"] == 6 and summary["final_val_loss"] > 0


def _run_and_kill(args, run_dir: Path, kill_at_step: int, timeout=240):
    proc = subprocess.Popen([sys.executable, "-m", "raptr", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and f'"step": {kill_at_step},' in metrics.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    return proc.returncode


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, data_cache):
    common = ["train", "--config", "bert-tiny-raptr", "-q", *TINY, f"data.cache_dir={data_cache}", *AUSTEN_DATA,
              "train.steps=20", "train.checkpoint_every=4", "train.eval_every=10", "method.raptr.schedule=3-4"]
    prepare_data(tiny_config(tmp_path, data_cache))  # build data outside the timed subprocesses
    straight = raptr_cli(*common, f"train.out_dir={tmp_path}/straight")
    assert straight.returncode == 0, straight.stderr
    rc = _run_and_kill(common + [f"train.out_dir={tmp_path}/killed"], tmp_path / "killed", kill_at_step=9)
    assert rc == -signal.SIGKILL  # really killed mid-run
    kept = int(checkpoint_dirs(tmp_path / "killed" / "checkpoints")[-1].name.split("_")[1])
    assert 8 <= kept < 20  # killed between checkpoints, before the end
    resumed = raptr_cli(*common, f"train.out_dir={tmp_path}/killed")
    assert resumed.returncode == 0, resumed.stderr
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]  # bitwise, not approx
    sa = json.loads((tmp_path / "straight" / "summary.json").read_text())
    sb = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert sa["final_val_loss"] == sb["final_val_loss"] and sa["flops"] == sb["flops"]


SAVER = """
import sys, torch
from pathlib import Path
from raptr.training.checkpoint import save_checkpoint
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(12)])  # ~50 MB: saving takes a while
for step in range(1, 10_000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    save_checkpoint(Path(sys.argv[1]), step, model, {"step": step, "blob": torch.full((10**6,), float(step))}, keep=2)
    print(step, flush=True)
"""


def test_kill_during_checkpoint_save_keeps_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    interrupted_saves = 0
    for trial, delay in enumerate([0.05, 0.13, 0.21]):
        root = tmp_path / f"ckpt{trial}"
        proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True)
        for _ in range(2):
            proc.stdout.readline()  # two checkpoints are complete
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted_saves += any(root.glob(".tmp-*"))
        done = checkpoint_dirs(root)
        assert len(done) >= 2
        model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(12)])
        for path in done:
            step = load_state(path)["step"]
            load_weights(path, model)
            assert all(torch.all(p == step) for p in model.parameters())
    assert interrupted_saves >= 1  # at least one kill really landed inside a save


def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_used(tmp_path, data_cache):
    cfg = tiny_config(tmp_path, data_cache, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    build_trainer(cfg, progress=False).fit()
    straight = train_losses(tmp_path / "run")
    ckpts = checkpoint_dirs(tmp_path / "run" / "checkpoints")
    blob = bytearray((ckpts[-1] / "model.safetensors").read_bytes())
    blob[-5] ^= 0x10  # one flipped bit in the weight data: loads fine, only the checksum sees it
    (ckpts[-1] / "model.safetensors").write_bytes(bytes(blob))
    (ckpts[-2] / "state.pt").write_bytes(b"garbage")  # and the one before is truncated
    (tmp_path / "run" / "summary.json").unlink()
    result = raptr_cli("train", "--config", "bert-tiny-raptr", "-q", *TINY, f"data.cache_dir={data_cache}",
                       *AUSTEN_DATA, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                       f"train.out_dir={tmp_path}/run")
    assert result.returncode == 0, result.stderr
    assert "does not match its checksum" in result.stderr and "resuming from step_0000002" in result.stderr
    assert "Traceback" not in result.stderr
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "corrupt-step_0000006" in names and "corrupt-step_0000004" in names  # set aside, not deleted
    assert train_losses(tmp_path / "run") == straight  # redone from step 2: the same losses
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fallback = [r for r in rows if r["kind"] == "warning" and "set aside" in r["message"]]
    assert [r["step"] for r in fallback] == [2, 2]  # logged at the step training resumed from


def test_nonfinite_steps_are_not_applied_and_every_checkpoint_is_finite(tmp_path, data_cache):
    args = ["train", "--config", "bert-tiny-raptr", "-q", *TINY, f"data.cache_dir={data_cache}", *AUSTEN_DATA,
            "train.steps=30", "train.checkpoint_every=1", "train.keep_checkpoints=50", "optim.lr=1e6",
            f"train.out_dir={tmp_path}/run"]
    result = raptr_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "non-finite steps in a row" in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    kept = checkpoint_dirs(tmp_path / "run" / "checkpoints")
    assert kept and any(p.name.startswith("nonfinite-") for p in (tmp_path / "run" / "checkpoints").iterdir())
    model = build_trainer(tiny_config(tmp_path, data_cache, "train.steps=30"), progress=False).model
    for path in kept:  # "last good" is true: every kept checkpoint holds finite weights
        load_weights(path, model)
        assert all(torch.isfinite(p).all() for p in model.parameters()), path
    def no_constants(name):
        raise AssertionError(f"metrics.jsonl holds {name}: not strict JSON")

    rows = [json.loads(line, parse_constant=no_constants)
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped") for r in rows) and any(r.get("loss") is None for r in rows)  # NaN written as null
    skipped = {r["step"] for r in rows if r["kind"] == "train" and r.get("skipped")}
    warned = [r for r in rows if r["kind"] == "warning" and "non-finite loss" in r["message"]]
    assert warned and all(r["message"].startswith(f"step {r['step']}:") and r["step"] in skipped for r in warned)
    first_bad = min(skipped)
    assert f"in a row from step {first_bad} " in result.stderr  # one step numbering everywhere (1-based)
    resumed = raptr_cli(*[a.replace("optim.lr=1e6", "optim.lr=1e-3") for a in args])  # the advised recovery works
    assert resumed.returncode in (0, 3), resumed.stderr
    assert "resuming at step" in resumed.stderr and "optim.lr: 1000000.0 -> 0.001" in resumed.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 30


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=5", "unknown config key 'train.stepz': did you mean 'train.steps'?"),
        ("train.steps=abc", "'train.steps' must be an integer"),
        ("train.steps=-3", "'train.steps' must be positive"),
        ("model.n_heads=3", "not divisible"),
        ("method.name=magic", "'method.name' is 'magic'"),
        ("method.raptr.schedule=8-6-12", "decreases"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers"),
        ("objective.mask_rate=1.5", "objective.mask_rate must be in (0, 1)"),
        ("model.family=hf", "does not fit"),  # hf bert is fine; combined below with causal
    ],
)
def test_config_errors_are_one_line_exit_2(tmp_path, override, message):
    extra = ["objective.name=causal", "model.hf_type=bert"] if override == "model.family=hf" else []
    result = raptr_cli("train", "--config", "bert-tiny-raptr", override, *extra, f"train.out_dir={tmp_path}/x",
                       "data.sources=/nonexistent/never-read")
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bad_config_files_and_presets(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: [\n")
    for args, message in [(["--config", str(bad)], "not valid YAML"),
                          (["--config", "no-such-preset"], "no config file or preset named"),
                          (["--config", "bert-tiny-raptr", "notakeyvalue"], "has no '='")]:
        result = raptr_cli("train", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_missing_source_path_is_a_clean_error(tmp_path):
    result = raptr_cli("train", "--config", "bert-tiny-raptr", f"data.cache_dir={tmp_path}", "data.sources=/no/such/dir",
                       f"train.out_dir={tmp_path}/x")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_other_config_in_same_out_dir_is_refused(tmp_path, data_cache):
    build_trainer(tiny_config(tmp_path, data_cache, "train.steps=2", "train.checkpoint_every=2"), progress=False).fit()
    result = raptr_cli("train", "--config", "bert-tiny-raptr", "-q", *TINY, f"data.cache_dir={data_cache}",
                       *AUSTEN_DATA, "train.steps=2", "train.seed=5", f"train.out_dir={tmp_path}/run")
    assert result.returncode == 2 and "holds a run with a different config (train.seed: 0 -> 5" in result.stderr, result.stderr


def _cli_args(tmp_path, data_cache, *extra):
    return ["train", "--config", "bert-tiny-raptr", "-q", *TINY, f"data.cache_dir={data_cache}", *AUSTEN_DATA,
            f"train.out_dir={tmp_path}/run", *extra]


def test_second_writer_is_refused_and_steps_are_logged_once(tmp_path, data_cache):
    prepare_data(tiny_config(tmp_path, data_cache))
    args = [sys.executable, "-m", "raptr", *_cli_args(tmp_path, data_cache, "train.steps=1500", "train.checkpoint_every=500")]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and '"train"' in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    second = raptr_cli(*_cli_args(tmp_path, data_cache, "train.steps=1500", "train.checkpoint_every=500"))
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 2 and "is in use by a running raptr (pid" in second.stderr, second.stderr
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"train"' in line]
    assert steps == list(range(1, 1501))  # each step exactly once, in order


def test_torn_metrics_line_and_truncated_config_still_resume(tmp_path, data_cache):
    straight = tiny_config(tmp_path / "a", data_cache, "train.steps=8", "train.checkpoint_every=4")
    build_trainer(straight, progress=False).fit()
    cfg = tiny_config(tmp_path, data_cache, "train.steps=8", "train.checkpoint_every=4")
    build_trainer(cfg, progress=False).fit(stop_after=6)  # checkpoint at 4 (and 6), log up to step 6
    run = tmp_path / "run"
    shutil.rmtree(checkpoint_dirs(run / "checkpoints")[-1])  # the newest is gone: resume from step 4
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # a writer killed mid-line
    (run / "config.json").write_text((run / "config.json").read_text()[:40])
    result = raptr_cli(*_cli_args(tmp_path, data_cache, "train.steps=8", "train.checkpoint_every=4"))
    assert result.returncode == 0, result.stderr
    assert "unreadable line" in result.stderr and "was damaged; rewritten" in result.stderr
    assert train_losses(run) == train_losses(tmp_path / "a" / "run")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert steps == list(range(1, 9))
    json.loads((run / "config.json").read_text())  # whole again


def test_sigterm_checkpoints_and_resumes_bitwise(tmp_path, data_cache):
    prepare_data(tiny_config(tmp_path, data_cache))
    extra = ["train.steps=30", "train.checkpoint_every=100", "train.eval_every=10"]
    straight = raptr_cli(*_cli_args(tmp_path / "s", data_cache, *extra))
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen([sys.executable, "-m", "raptr", *_cli_args(tmp_path, data_cache, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count('"train"') >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in err and "run the same command again to resume" in err and "Traceback" not in err
    stopped = checkpoint_dirs(tmp_path / "run" / "checkpoints")
    assert stopped and 5 <= int(stopped[-1].name.split("_")[1]) < 30  # a checkpoint where it stopped
    resumed = raptr_cli(*_cli_args(tmp_path, data_cache, *extra))
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "s" / "run")  # bitwise


def test_extending_steps_on_resume_only_where_the_method_allows(tmp_path, data_cache):
    std = ["method.name=standard", "train.checkpoint_every=2"]
    build_trainer(tiny_config(tmp_path, data_cache, "train.steps=4", *std), progress=False).fit()
    more = raptr_cli(*_cli_args(tmp_path, data_cache, "train.steps=6", *std))
    assert more.returncode == 0 and "train.steps: 4 -> 6" in more.stderr, more.stderr
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, 7))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "resume" and r["changed"] == {"train.steps": [4, 6]} for r in rows)
    build_trainer(tiny_config(tmp_path / "r", data_cache, "train.steps=4", "train.checkpoint_every=2"), progress=False).fit()
    refused = raptr_cli(*_cli_args(tmp_path / "r", data_cache, "train.steps=6", "train.checkpoint_every=2"))
    assert refused.returncode == 2 and "raptr's schedule depends on train.steps" in refused.stderr, refused.stderr


def test_divergence_without_nan_is_warned_and_exits_3(tmp_path, data_cache):
    result = raptr_cli(*_cli_args(tmp_path, data_cache, "train.steps=40", "train.eval_every=10", "optim.lr=30",
                                  "train.checkpoint_every=100"))
    assert result.returncode == 3, result.stderr
    assert "warning: the run diverged" in result.stderr and "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged"] and summary["warnings"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "warning" and "diverg" in r["message"] for r in rows)


@pytest.mark.parametrize("after", [0.2, 0.5, 1.0])
def test_ctrl_c_at_any_moment_of_the_start_is_one_line(tmp_path, data_cache, after):
    """Ctrl-C (SIGINT) while Python imports, while the run is built, or once it trains: one line on
    stderr, exit code 130, never a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "raptr", *_cli_args(tmp_path, data_cache, "train.steps=30")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(("interrupted", "stopped by SIGINT")), err


@pytest.mark.parametrize("damage", ["deleted", "cut"])
def test_a_lost_metrics_history_is_resumed_with_a_warning_saying_what_was_lost(tmp_path, data_cache, damage):
    extra = ["train.steps=8", "train.checkpoint_every=4", "train.eval_every=100"]
    first = raptr_cli(*_cli_args(tmp_path, data_cache, *extra), "--stop-after", "4")
    assert first.returncode == 0, first.stderr
    log = tmp_path / "run" / "metrics.jsonl"
    if damage == "deleted":
        log.unlink()
        expect = "was missing: the log of steps 1-4 is lost"
    else:  # only the first two train records survive
        rows = [line for line in log.read_text().splitlines() if '"train"' not in line or json.loads(line)["step"] <= 2]
        log.write_text("\n".join(rows) + "\n")
        expect = "lacks the train records of 2 of the 4 steps before the checkpoint (steps 3-4)"
    second = raptr_cli(*_cli_args(tmp_path, data_cache, *extra))
    assert second.returncode == 0, second.stderr
    assert expect in second.stderr and "Traceback" not in second.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"][-4:] == [5, 6, 7, 8]  # training went on
    assert any(r["kind"] == "warning" and expect in r["message"] for r in rows)


def test_the_recorded_commit_is_dirty_only_for_changes_to_the_code(tmp_path, data_cache):
    """A comparison rewrites its own results (compare.json) while runs start: that is not code, and must
    not mark the run's commit ``+dirty``; a change under src/raptr must, and then ``raptr train`` refuses
    to start unless --allow-dirty, which keeps the diff in the run directory beside the machine record."""
    root = Path(__file__).resolve().parents[1]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(root), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", "HEAD", "--", "src", "README.md"], cwd=clone, check=True)
    code = "from raptr.training.provenance import git_commit; print(git_commit())"

    def commit() -> str:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(clone / "src")}).stdout.strip()

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    (clone / "README.md").write_text("results written beside the code\n")
    assert commit() == head
    (clone / "src" / "raptr" / "errors.py").write_text((clone / "src" / "raptr" / "errors.py").read_text() + "\n# edited\n")
    assert commit() == head + "+dirty"
    env = {"PYTHONPATH": str(clone / "src"), "RAPTR_ALLOW_DIRTY": "0"}
    refused = raptr_cli(*_cli_args(tmp_path, data_cache), env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "uncommitted changes" in refused.stderr and "--allow-dirty" in refused.stderr
    assert not (tmp_path / "run").exists()  # nothing started
    allowed = raptr_cli(*_cli_args(tmp_path, data_cache, "train.steps=2", "--allow-dirty"), env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert "+# edited" in (tmp_path / "run" / "code.diff").read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["git_commit"] == head + "+dirty"
    assert summary["machine"]["torch"] == torch.__version__ and summary["machine"]["threads"] >= 1
    assert summary["machine"]["cpu"]
