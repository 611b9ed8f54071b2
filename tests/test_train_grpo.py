"""train_grpo.py end to end on the tiny default: one process, two ranks under torchrun, kill and resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import evaluate
import train_grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("loss", "reward", "kl", "grad_norm", "completion_length", "entropy")


def tiny_run(tiny, out_dir, **kw):
    kw = {"max_completion_length": 24, "max_steps": 4, "save_every": 2, "reward_funcs": ["toy_even_length"], **kw}
    return replace(train_grpo.tiny_config(), model=os.path.join(tiny, "qwen2_vl"), data_root=os.path.join(tiny, "data"),
                   out_dir=str(out_dir), reward_module="tests.toy_rewards", **kw)


def cli(cfg) -> list[str]:
    args = []
    for k, v in cfg.__dict__.items():
        args += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return args


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_uninterrupted")
    history = train_grpo.main(tiny_run(tiny, out))
    return out, history


def close(a: dict, b: dict, rel=1e-4, abs=1e-6):
    return all(a[k] == pytest.approx(b[k], rel=rel, abs=abs) for k in COMPARED)


def assert_same_run(metrics_file, history):
    """Step for step, the run in `metrics_file` equals the one-process `history`."""
    rows = [json.loads(line) for line in open(metrics_file)]
    assert len(rows) == len(history)
    for a, b in zip(rows, history):
        assert close(a, b), (a, b)


def assert_logged_once(out, history):
    """metrics.jsonl, rollouts.jsonl and TensorBoard hold steps 1..4 once each, equal to `history`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert_same_run(out / "metrics.jsonl", history)
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in open(out / "rollouts.jsonl")] == [1, 2, 3, 4]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([h["loss"] for h in history], rel=1e-4, abs=1e-6)


def test_tiny_grpo_learns_and_writes_everything(uninterrupted, tiny):
    out, history = uninterrupted
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert any(h["loss"] != 0 for h in history) and all(0 < h["reward"] < 1 for h in history)
    assert history[0]["kl"] == pytest.approx(0, abs=1e-6) and history[-1]["kl"] > 0   # the policy moved
    assert all(h["grad_norm"] > 0 for h in history)
    assert history[1]["lr"] < history[0]["lr"]                                        # linear decay
    for name in ("config.json", "metrics.jsonl", "rollouts.jsonl", "checkpoints/step_0000002/meta.json",
                 "checkpoints/step_0000004/meta.json", "export/model.safetensors", "export/processor_config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert open(os.path.join(out, "checkpoints", "latest")).read() == "step_0000004"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    rollout = json.loads(open(os.path.join(out, "rollouts.jsonl")).readline())
    assert len(rollout["completions"]) == 4 and len(rollout["advantages"]) == 4
    # the export loads in transformers and evaluates
    results = evaluate.main(evaluate.Config(model=os.path.join(out, "export"), data_root=os.path.join(tiny, "data"),
                                            out_dir=str(out / "eval"), levels=["L1"], limit=2, max_new_tokens=4,
                                            num_workers=0))
    assert results["table"]["L1"]["questions"] == 2


def test_export_differs_from_the_start_and_matches_training(uninterrupted, tiny):
    from safetensors.torch import load_file
    out, _ = uninterrupted
    before = load_file(os.path.join(tiny, "qwen2_vl", "model.safetensors"))
    after = load_file(os.path.join(out, "export", "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)


@pytest.mark.slow
def test_two_ranks_match_one_process(uninterrupted, tiny, tmp_path):
    """Two ranks with one question each = one process with two questions, step for step (and FSDP2
    with activation checkpointing over the shared-prompt forward = plain autograd)."""
    from safetensors.torch import load_file
    out, history = uninterrupted
    cfg = tiny_run(tiny, tmp_path, questions_per_rank=1, activation_checkpointing=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "train_grpo.py", *cli(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                            env={**env, "SBR_KILL_AT": "export:written"})      # after the last step's checkpoint
    assert killed.returncode != 0 and (tmp_path / CK / "latest").read_text() == "step_0000004"
    run = subprocess.run(cmd + ["--resume", "true"], cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "at step 4" in run.stdout and "step 3/4" not in run.stdout         # the export finished, no step re-run
    assert_same_run(tmp_path / "metrics.jsonl", history)
    one, two = load_file(out / "export" / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)


@pytest.mark.slow
def test_kill_and_resume_continues_with_the_same_losses(uninterrupted, tiny, tmp_path):
    _, history = uninterrupted
    cfg = tiny_run(tiny, tmp_path)
    cmd = [sys.executable, "train_grpo.py", *cli(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)                     # dies somewhere in step 3
    proc.wait()
    assert latest.read_text() == "step_0000002" and not (tmp_path / "export").exists()
    done = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert done[:2] == [1, 2] and 4 not in done

    run = subprocess.run(cmd + ["--resume", "true"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert "resumed from" in run.stdout
    assert_logged_once(tmp_path, history)
    assert (tmp_path / "export" / "model.safetensors").exists()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_match_one_process(uninterrupted, tiny, tmp_path):
    """launch/multinode.sh on two 'nodes' of this machine (one rank each), rendezvous on 127.0.0.1."""
    _, history = uninterrupted
    cfg = tiny_run(tiny, tmp_path, questions_per_rank=1, export=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNODES": "2", "NGPU": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RDZV_ID": "sbr-test"}
    nodes = [subprocess.Popen(["bash", "launch/multinode.sh", "train_grpo.py", *cli(cfg)], cwd=ROOT,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outs = [node.communicate(timeout=400) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-3000:] for _, err in outs]
    assert_same_run(tmp_path / "metrics.jsonl", history)


@pytest.mark.slow
def test_hsdp_two_replicas_match_one_process(uninterrupted, tiny, tmp_path):
    """shard_group_size 1 on 2 ranks: a (2 replicas x 1 shard) mesh, gradients all-reduced across."""
    _, history = uninterrupted
    cfg = tiny_run(tiny, tmp_path, questions_per_rank=1, export=False, shard_group_size=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train_grpo.py", *cli(cfg)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert_same_run(tmp_path / "metrics.jsonl", history)


def test_question_seeds_never_collide():
    """Every (seed, epoch, index) of the full 50,269-question training set over 3 epochs and 3 seeds gets
    its own stream; the old seed * 1_000_003 + epoch * 7919 + index collided past index 7,919."""
    from sbr.training import question_seed
    seeds = {question_seed(s, e, i) for s in (0, 1, 42) for e in range(3) for i in range(50_269)}
    assert len(seeds) == 3 * 3 * 50_269 and all(0 <= x < 2**63 for x in list(seeds)[:1000])
    assert len({42 * 1_000_003 + e * 7919 + i for e in range(2) for i in range(50_269)}) < 2 * 50_269


def test_all_masked_steps_stay_finite(tiny, tmp_path):
    """mask_truncated with 2-token completions masks (nearly) every completion; with dapo the step's
    normaliser is 0. Loss, gradient norm and weights stay finite, and completion_length reports the
    tokens generated (2 each), not the masked count (0)."""
    import math
    from safetensors.torch import load_file
    history = train_grpo.main(tiny_run(tiny, tmp_path, loss_type="dapo", mask_truncated=True,
                                       max_completion_length=2, max_steps=2, save_every=100))
    for h in history:
        assert all(math.isfinite(v) for v in h.values()), h
        assert 1 <= h["completion_length"] <= 2 and h["truncated"] > 0.5
    weights = load_file(os.path.join(tmp_path, "export", "model.safetensors"))
    assert all(w.float().isfinite().all() for w in weights.values())


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_bf16_grpo_step_and_evaluation_on_the_cpu(tiny, tmp_path, monkeypatch, family):
    """The GPU path's dtypes on the CPU: FSDP2 bf16 mixed precision for a GRPO step (rollout,
    shared-prompt forward, loss) and a bf16 evaluation batch of Qwen2.5-VL. Every mRoPE computation
    must see second_per_grid_ts in fp32 with the collator's values (FSDP2 used to cast it to bf16)."""
    import math
    import sbr.positions
    seen = []
    original = sbr.positions.rope_index

    def recording(*args, **kwargs):
        if kwargs.get("second_per_grid_ts") is not None:
            seen.append(kwargs["second_per_grid_ts"].clone())
        return original(*args, **kwargs)
    monkeypatch.setattr(sbr.positions, "rope_index", recording)
    cfg = replace(tiny_run(tiny, tmp_path, max_steps=1, save_every=100, export=False),
                  model=os.path.join(tiny, family), dtype="bfloat16")
    [step] = train_grpo.main(cfg)
    assert all(math.isfinite(v) for v in step.values()) and step["kl"] == pytest.approx(0, abs=1e-2)
    # the rollout's sampling log-probs and the training forward's, both in bf16 compute with fp32 logits
    assert step["sampling_logp_difference_mean"] < 0.02 and step["sampling_logp_difference_max"] < 0.2, step
    assert seen and all(s.dtype == torch.float32 for s in seen)
    from sbr.collate import VideoCollator
    from sbr.data import load_seedbench
    from sbr.model import load_processor
    train = load_seedbench(os.path.join(tiny, "data", cfg.train_file), os.path.join(tiny, "data"), seed=cfg.seed)
    collator = VideoCollator(load_processor(cfg.model))
    exact = {round(2 / collator.load(s)["sample_fps"], 6) for s in train if s.video}
    assert {round(float(x), 6) for s in seen for x in s} <= exact       # fp32 values, not bf16-rounded ones

    seen.clear()
    results = evaluate.main(evaluate.Config(model=cfg.model, data_root=os.path.join(tiny, "data"), dtype="bfloat16",
                                            out_dir=str(tmp_path / "eval"), levels=["L1"], limit=3, batch_size=3,
                                            max_new_tokens=4, num_workers=0))
    assert results["table"]["L1"]["questions"] == 3 and results["provenance"]["identity"]["dtype"] == "bfloat16"
    assert seen and all(s.dtype == torch.float32 for s in seen)


# ---------------------------------------------------------------------------- runs that survive
def copy_run(uninterrupted, tmp_path):
    """The uninterrupted run's folder without its export: as if killed after step 4's checkpoint."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run)
    shutil.rmtree(run / "export")
    return run


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


CK = "checkpoints"
DAMAGES = {   # what is done to the run folder -> (message printed on resume, step resumed from)
    "latest holds garbage": (lambda r: (r / CK / "latest").write_bytes(b"\x00\xffstep_99"), "not a checkpoint folder", 4),
    "killed before step 4's save": (lambda r: [__import__("shutil").rmtree(r / CK / "step_0000004"),
                                               (r / CK / "latest").unlink()], "resumed from", 2),
    "truncated shard": (lambda r: truncate(r / CK / "step_0000004" / "__0_0.distcp"), "__0_0.distcp: truncated", 2),
    "truncated rank0.pt": (lambda r: truncate(r / CK / "step_0000004" / "rank0.pt"), "rank0.pt: unreadable", 2),
    "garbage meta.json": (lambda r: (r / CK / "step_0000004" / "meta.json").write_text("{not json"), "meta.json: unreadable", 2),
    "no checkpoint, --resume --overwrite": (lambda r: __import__("shutil").rmtree(r / CK),
                                            "no complete checkpoint in", 0),      # (tiny_run overwrites)
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_to_the_newest_complete_checkpoint(uninterrupted, tiny, tmp_path, capsys, damage):
    """Whatever `latest` says and whatever is damaged, --resume takes the newest complete checkpoint,
    says what it skipped (naming the file), recomputes the steps after it equal to the uninterrupted
    run, and the logs hold each step once."""
    _, history = uninterrupted
    run = copy_run(uninterrupted, tmp_path)
    hurt, words, step = DAMAGES[damage]
    hurt(run)
    train_grpo.main(tiny_run(tiny, run, resume=True, keep_checkpoints=1))
    out = capsys.readouterr().out
    assert words in out, out
    assert (f"resumed from {run / CK / f'step_{step:07d}'} at step {step}" in out) == (step > 0)
    assert_logged_once(run, history)
    if step < 4:                                                                 # a save happened
        assert sorted(os.listdir(run / CK)) == ["latest", "step_0000004"]        # --keep_checkpoints 1
    assert (run / "export" / "model.safetensors").exists()


EVERY = {   # done to every checkpoint of the run -> what names it in the error
    "truncated shard": (lambda p: truncate(p / "__0_0.distcp"), "__0_0.distcp: truncated"),
    "no .metadata": (lambda p: (p / ".metadata").unlink(), ".metadata: unreadable"),
    "no meta.json": (lambda p: (p / "meta.json").unlink(), "meta.json: unreadable"),
    "truncated rank0.pt": (lambda p: truncate(p / "rank0.pt"), "rank0.pt: unreadable"),
    "no checkpoint left": (lambda p: __import__("shutil").rmtree(p), "holds an earlier run (metrics.jsonl)"),
}


def test_resume_never_starts_over_silently(uninterrupted, tiny, tmp_path):
    """With no complete checkpoint left, --resume stops naming each damaged file and --overwrite true;
    the logs are untouched."""
    import shutil
    from sbr.common import ConfigError
    run = copy_run(uninterrupted, tmp_path)
    logged = (run / "metrics.jsonl").read_text()
    for name, (hurt, words) in EVERY.items():
        work = tmp_path / name.replace(" ", "_")
        shutil.copytree(run, work)
        for step in (2, 4):
            hurt(work / CK / f"step_{step:07d}")
        with pytest.raises(ConfigError) as err:
            train_grpo.main(tiny_run(tiny, work, resume=True, overwrite=False))
        message = str(err.value)
        assert "no complete checkpoint" in message and "--overwrite true" in message, message
        assert message.count(words) == (1 if name == "no checkpoint left" else 2), message
        assert (work / "metrics.jsonl").read_text() == logged


def test_nothing_is_deleted_unless_asked(uninterrupted, tiny, tmp_path):
    """A folder holding a run is refused without --resume or --overwrite; --overwrite keeps the earlier
    export (as export.previous) through a crash, until its own export is in place."""
    import shutil
    from sbr.common import ConfigError
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    shutil.rmtree(out / CK)                                        # an export and logs, no checkpoint
    with pytest.raises(ConfigError, match=re.escape("holds an earlier run (export, metrics.jsonl): --resume true "
                                                    "continues it, --overwrite true deletes it")):
        train_grpo.main(tiny_run(tiny, out, overwrite=False))
    weights = (out / "export" / "model.safetensors").read_bytes()
    cfg = tiny_run(tiny, out, overwrite=True)
    killed = subprocess.run([sys.executable, "train_grpo.py", *cli(cfg)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "SBR_KILL_AT": "export:swapped"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "export").exists() and (out / "export.previous" / "model.safetensors").read_bytes() == weights
    train_grpo.main(replace(cfg, resume=True, overwrite=False))    # finishes the export, then drops the old one
    assert (out / "export" / "model.safetensors").exists() and not (out / "export.previous").exists()


def test_resume_refuses_a_different_run(uninterrupted, tiny, tmp_path):
    """Flags that change the run, and the training file's content, must match the checkpoint's, unless
    --allow_config_change; without --resume, an out_dir holding checkpoints needs --overwrite."""
    from sbr.common import ConfigError
    run = copy_run(uninterrupted, tmp_path)
    with pytest.raises(ConfigError) as err:
        train_grpo.main(tiny_run(tiny, run, resume=True, learning_rate=2e-4, num_generations=2))
    assert "--learning_rate: 0.0001 in the checkpoint, 0.0002 now" in str(err.value)
    assert "--num_generations: 4 in the checkpoint, 2 now" in str(err.value)
    assert "--allow_config_change true" in str(err.value)
    import shutil
    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny, "data"), data)
    with open(data / "annotations" / "training_6k.jsonl", "a") as f:
        f.write(open(data / "annotations" / "training_6k.jsonl").readline().replace('"sample_id": 0', '"sample_id": 99'))
    with pytest.raises(ConfigError, match="train_sha256"):
        train_grpo.main(replace(tiny_run(tiny, run, resume=True), data_root=str(data)))
    with pytest.raises(ConfigError, match="holds an earlier run"):
        train_grpo.main(tiny_run(tiny, run, overwrite=False))            # (the tiny preset overwrites)
    (run / CK / "step_0000004").rename(run / CK / "gone")             # resume from step 2, new lr accepted
    history = train_grpo.main(tiny_run(tiny, run, resume=True, learning_rate=2e-4, allow_config_change=True))
    assert [h["step"] for h in history] == [3, 4]
    fresh = train_grpo.main(tiny_run(tiny, run, overwrite=True, max_steps=1))
    assert [h["step"] for h in fresh] == [1] and not (run / CK / "gone").exists()
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("point, resumed_at", [("save:written@4", 2), ("save:renamed@4", 4), ("export:written", 4)])
def test_killed_while_saving_or_exporting(uninterrupted, tiny, tmp_path, point, resumed_at, capsys):
    """SIGKILL after every rank wrote step 4 but before the rename (a .tmp folder is left), between the
    rename and the `latest` update, and in the middle of the export: resume continues from the newest
    complete checkpoint, the logs hold each step once, the export appears whole."""
    _, history = uninterrupted
    cfg = tiny_run(tiny, tmp_path)
    run = subprocess.run([sys.executable, "train_grpo.py", *cli(cfg)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "SBR_KILL_AT": point})
    assert run.returncode == -signal.SIGKILL
    assert not (tmp_path / "export").exists()
    train_grpo.main(replace(cfg, resume=True))
    assert f"at step {resumed_at}" in capsys.readouterr().out
    assert_logged_once(tmp_path, history)
    assert not [p for p in os.listdir(tmp_path / CK) if p.endswith(".tmp")] and not (tmp_path / "export.tmp").exists()
    assert (tmp_path / "export" / "model.safetensors").exists()


def corrupt_first_drawn_video(tiny, tmp_path):
    """A copy of the tiny data whose first training question drawn with a video (step 1 or 2) has
    garbage in its .mp4; returns (data root, that question's line, the video path)."""
    import shutil
    from sbr.data import load_seedbench
    from sbr.training import StepSampler
    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny, "data"), data)
    train = load_seedbench(str(data / "annotations" / "training_6k.jsonl"), str(data), seed=42)
    drawn = [i for batch in StepSampler(len(train), 2, 0, 0, 1, 2, 42) for i in batch]
    victim = next(train[i] for i in drawn if train[i].video)
    with open(victim.video, "wb") as f:
        f.write(b"this is not a video")
    return data, victim.source[1], victim.video


def test_unreadable_media_never_ends_a_run(uninterrupted, tiny, tmp_path, capsys):
    """A garbage .mp4: the question is replaced by a deterministic other one, the message names the
    annotation file, line, field and the video; the count is a metric; a resumed run equals the
    uninterrupted one. With --on_missing error, or past --max_bad_media, the run stops naming it; the
    preflight check finds it (and a bad image) before step 0, all at once."""
    from sbr.data import DataError
    data, line, video = corrupt_first_drawn_video(tiny, tmp_path)
    cfg = replace(tiny_run(tiny, tmp_path / "run", max_bad_media=0.1), data_root=str(data))    # 1 of 16 allowed
    history = train_grpo.main(cfg)
    where = f"{data / 'annotations' / 'training_6k.jsonl'}:{line}: field 'video_basename': {video}: cannot read video"
    assert where in capsys.readouterr().out
    assert history[-1]["bad_media"] == 1 and all(0 < h["reward"] < 1 for h in history)
    (tmp_path / "run" / CK / "step_0000004").rename(tmp_path / "run" / CK / "gone")
    train_grpo.main(replace(cfg, resume=True))
    assert_logged_once(tmp_path / "run", history)
    for kw in ({"on_missing": "error"}, {"max_bad_media": 0.0}):
        with pytest.raises(DataError, match="cannot read video") as err:
            train_grpo.main(replace(cfg, out_dir=str(tmp_path / "other"), **kw))
        assert f"training_6k.jsonl:{line}: field 'video_basename'" in str(err.value)
    image = data / "images" / "EpicKitchens" / "training_6k_001.png"
    image.write_bytes(b"GIF89a not a png")
    with pytest.raises(DataError, match="preflight: 2 of 16 questions") as err:
        train_grpo.main(replace(cfg, out_dir=str(tmp_path / "other"), preflight=True, on_missing="error"))
    assert "training_6k.jsonl:2: field 'current_observation_basename'" in str(err.value) and video in str(err.value)


def test_export_in_the_base_models_dtype(tiny, tmp_path):
    """A bf16 base model exports in bf16 (half the disk of fp32; Qwen2-VL-7B: 16.6 GB, not 33), and the
    export loads in transformers and evaluate.py."""
    import shutil
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    base = tmp_path / "base"
    shutil.copytree(os.path.join(tiny, "qwen2_vl"), base)
    AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)
    train_grpo.main(replace(tiny_run(tiny, tmp_path / "run", max_steps=1), model=str(base)))
    export = tmp_path / "run" / "export"
    weights = load_file(export / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert json.load(open(export / "config.json"))["dtype"] == "bfloat16"
    results = evaluate.main(evaluate.Config(model=str(export), data_root=os.path.join(tiny, "data"), levels=["L1"],
                                            limit=1, max_new_tokens=2, num_workers=0, out_dir=str(tmp_path / "eval")))
    assert results["table"]["L1"]["questions"] == 1


def checkpoint_tensors(path, out) -> dict:
    """A DCP checkpoint as plain tensors ({"model": ..., "reference": ...}), through the file `out`."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=True)


def test_grpo_care_ema_reference_and_resume(tiny, tmp_path):
    """GRPO-CARE's settings on the tiny default (β = 0, consistency bonus 0.5, EMA reference), d = 0.5
    updated every step so it shows: after step 1 π_ref = d θ_0 + (1-d) θ_1, after step 2 π_ref = d π_ref +
    (1-d) θ_2 (θ_0 the base model, θ_k the policy after update k). A run resumed at step 1 ends with the
    same reference, to the bit: the EMA weights travel in the checkpoint."""
    from safetensors.torch import load_file
    care = dict(beta=0.0, reference="ema", ema_decay=0.5, ema_every=1, consistency_bonus=0.5, max_steps=2,
                save_every=1, reward_funcs=["toy_even_length", "accuracy"], reward_weights=[1.0, 1.0])
    out = tmp_path / "care"
    history = train_grpo.main(tiny_run(tiny, out, **care))
    assert {"care/likelihood", "care/bonus_rate", "care/bonus", "care/answered"} <= set(history[0])
    s1 = checkpoint_tensors(str(out / "checkpoints" / "step_0000001"), tmp_path / "s1.pt")
    s2 = checkpoint_tensors(str(out / "checkpoints" / "step_0000002"), tmp_path / "s2.pt")
    base = load_file(os.path.join(tiny, "qwen2_vl", "model.safetensors"))
    moved = 0
    for name, ref1 in s1["reference"].items():
        if not name.startswith("model.") or name[len("model."):] not in base:
            continue
        theta0 = base[name[len("model."):]].float()
        assert torch.allclose(ref1, 0.5 * theta0 + 0.5 * s1["model"][name], atol=1e-6), name
        assert torch.allclose(s2["reference"][name], 0.5 * ref1 + 0.5 * s2["model"][name], atol=1e-6), name
        moved += not torch.equal(ref1, theta0)
    assert moved > 0                                               # the reference left the base model

    resumed = tmp_path / "resumed"
    import shutil
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000001")
    train_grpo.main(tiny_run(tiny, resumed, **care, resume=True))
    r2 = checkpoint_tensors(str(resumed / "checkpoints" / "step_0000002"), tmp_path / "r2.pt")
    assert all(torch.equal(r2["reference"][k], s2["reference"][k]) for k in s2["reference"])
    assert all(torch.equal(r2["model"][k], s2["model"][k]) for k in s2["model"])


def test_a_reward_from_a_file_gets_the_questions_record(tiny, tmp_path):
    """--reward_module as a .py path; the reward asks for options and sample_id by name and gets, for
    every completion, the record of the question it answers."""
    from sbr.data import load_seedbench
    from sbr.rewards import REWARDS
    (tmp_path / "my_rewards.py").write_text(
        "import json, os\nfrom sbr.rewards import register\n\n"
        "@register('logs_its_record')\ndef logs(completion, answer, *, options, sample_id):\n"
        "    with open(os.path.join(os.path.dirname(__file__), 'calls.jsonl'), 'a') as f:\n"
        "        f.write(json.dumps([sample_id, answer, options]) + '\\n')\n"
        "    return float(len(completion) % 2)\n")
    try:
        history = train_grpo.main(replace(tiny_run(tiny, tmp_path / "run", max_steps=1, export=False),
                                          reward_module=str(tmp_path / "my_rewards.py"),
                                          reward_funcs=["logs_its_record"]))
    finally:
        REWARDS.pop("logs_its_record", None)
    calls = [json.loads(line) for line in open(tmp_path / "calls.jsonl")]
    train = {s.sample_id: s for s in load_seedbench(os.path.join(tiny, "data", "annotations", "training_6k.jsonl"),
                                                    os.path.join(tiny, "data"), seed=42)}   # (options shuffled by the seed)
    assert len(calls) == 2 * 4 and len({c[0] for c in calls}) == 2                   # Q = 2 questions x G = 4
    assert all([train[i].answer, train[i].options] == [a, o] for i, a, o in calls)
    assert "rewards/logs_its_record" in history[0]


def test_an_export_replaces_the_one_there_only_once_it_is_whole(tiny, tmp_path, monkeypatch):
    """A crash after the old export was moved aside, before the new one is renamed in: the old one is
    whole in export.previous; the next export puts the new one in place, then drops the old."""
    from sbr import checkpoint
    from sbr.model import load_model, load_processor
    from sbr.policy import Policy
    path = os.path.join(tiny, "qwen2_vl")
    policy, processor, out = Policy(load_model(path)), load_processor(path), tmp_path / "export"
    checkpoint.export(str(out), policy, processor)
    old = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)

    class Killed(Exception):
        pass

    def kill(name, step=None):
        if name == "export:swapped":
            raise Killed
    monkeypatch.setattr(checkpoint, "_kill_point", kill)
    with pytest.raises(Killed):
        checkpoint.export(str(out), policy, processor)
    assert not out.exists() and (tmp_path / "export.previous" / "model.safetensors").read_bytes() == old
    monkeypatch.undo()
    checkpoint.export(str(out), policy, processor)
    assert (out / "model.safetensors").read_bytes() != old
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("variant", [
    dict(loss_type="bnpo", top_entropy_quantile=0.5, entropy_coef=0.01, rollout_is_cap=2.0, off_policy_mask_threshold=0.0),
    dict(loss_type="luspo", importance_sampling_level="sequence", delta=1.5, use_bias_correction_kl=True, beta=0.05)])
def test_every_loss_switch_runs_and_micro_batching_never_changes_the_step(tiny, tmp_path, variant):
    """A step of the trainer with the variants' switches on (sbr/grpo.py, tests/test_loss_variants.py):
    the same loss and gradient norm whether its 2 questions go through in one micro-batch or two, the
    high-entropy mask keeping about the asked fraction of tokens over the step."""
    steps = [train_grpo.main(tiny_run(tiny, tmp_path / str(m), max_steps=1, export=False, micro_batch_questions=m,
                                      **variant))[0] for m in (2, 1)]
    one, two = steps
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5) and one["grad_norm"] > 0
    if "top_entropy_quantile" in variant:
        assert 0.4 <= one["entropy_kept"] <= 0.6 and 0 < one["rollout_is_ratio"] <= 2
        assert 0 <= one["off_policy_dropped"] <= 1


@pytest.mark.slow
def test_dynamic_sampling_trains_only_informative_groups_and_resumes_the_same(tiny, tmp_path):
    """DAPO's dynamic sampling on a reward that leaves ~40% of groups of 4 all equal: every step trains
    only groups whose rewards differ unless its 3 extra rounds ran out, some groups were dropped, and a
    run killed after its step-4 checkpoint was written but not yet in place resumes at step 2 and draws and
    trains steps 3 and 4 exactly as the uninterrupted run."""
    cfg = tiny_run(tiny, tmp_path / "whole", reward_funcs=["toy_one_in_five"], dynamic_sampling=True, export=False)
    history = train_grpo.main(cfg)
    for h in history:
        assert h["zero_std_groups"] == 0 or h["dynamic/rounds"] == 3, h
        assert h["dynamic/extra_rollouts"] == 2 * h["dynamic/rounds"] and h["dynamic/informative"] == 1 - h["zero_std_groups"]
    assert sum(h["dynamic/dropped"] for h in history) > 0
    cut = replace(cfg, out_dir=str(tmp_path / "cut"))
    run = subprocess.run([sys.executable, "train_grpo.py", *cli(cut)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "SBR_KILL_AT": "save:written@4"})
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    resumed = train_grpo.main(replace(cut, resume=True))
    assert [h["step"] for h in resumed] == [3, 4]
    assert_same_run(tmp_path / "cut" / "metrics.jsonl", history)
    for a, b in zip(history[2:], resumed):
        assert {k: v for k, v in a.items() if k.startswith("dynamic/")} == {k: v for k, v in b.items() if k.startswith("dynamic/")}


def test_loss_settings_that_would_silently_scale_the_gradient_are_refused(tiny, tmp_path):
    from sbr.common import ConfigError
    cfg = tiny_run(tiny, tmp_path)
    with pytest.raises(ConfigError, match=r"--loss_type cispo: --epsilon_high is CISPO's cap on the ratio itself"):
        train_grpo.check_config(replace(cfg, loss_type="cispo"))
    with pytest.raises(ConfigError, match=r"--delta 1.1: two-sided clipping caps the ratio above 1 \+ --epsilon_high"):
        train_grpo.check_config(replace(cfg, delta=1.1))
    train_grpo.check_config(replace(cfg, loss_type="cispo", epsilon_high=5.0, delta=4.0))   # delta: the clip's only
    train_grpo.check_config(replace(cfg, epsilon_high=0.28, delta=4.0))


@pytest.mark.slow
def test_dynamic_sampling_on_two_ranks(tiny, tmp_path):
    """Two gloo ranks whose rounds of extra questions differ (one rank may have its groups while the other
    rolls out more): every rank joins every round, the run finishes, no trained group is all-equal unless
    the rounds ran out."""
    cfg = tiny_run(tiny, tmp_path, reward_funcs=["toy_one_in_five"], dynamic_sampling=True, max_steps=3, export=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train_grpo.py", *cli(cfg)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 3 and sum(r["dynamic/rounds"] for r in rows) > 0
    assert all(r["zero_std_groups"] == 0 or r["dynamic/rounds"] == 3 for r in rows)


def test_grpo_care_with_the_authors_rewards_and_answer_tokens(tiny, tmp_path):
    """--reward_funcs accuracy_exact format_full --likelihood_tokens authors: GRPO-CARE as released runs a
    step, the bonus read from the authors' accuracy."""
    [step] = train_grpo.main(tiny_run(tiny, tmp_path, beta=0.0, reference="ema", consistency_bonus=0.5, max_steps=1,
                                      export=False, likelihood_tokens="authors",
                                      reward_funcs=["toy_even_length", "accuracy_exact", "format_full"]))
    assert {"care/likelihood", "care/bonus_rate", "rewards/accuracy_exact", "rewards/format_full"} <= set(step)
