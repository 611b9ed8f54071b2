import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_rollout_gathers_parameters_once_not_per_token(tiny):
    """Two ranks: sample() on the FSDP2-sharded policy gathers each unit once and gives the unsharded
    model's tokens and log-probs; the vision tower is resharded while it decodes; decoding outside `gathered`
    is refused; nesting is harmless."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "tests/fsdp_gathers.py", tiny]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    sharded, plain = result["sharded"], result["plain"]
    assert sharded["ids"] == plain["ids"]                          # the same completions as unsharded
    assert max(abs(a - b) for x, y in zip(sharded["logp"], plain["logp"]) for a, b in zip(x, y)) < 1e-5
    assert 0 < sharded["all_gathers"] <= result["units"]           # one per FSDP unit, not one per token
    assert plain["all_gathers"] == 0
    assert "gathered" in result["outside"]                         # decoding a sharded model says what to do
    assert result["still_gathered"]
    watched = result["vision_sharded_while_decoding"]              # the prefill released the vision tower
    assert len(watched) >= 15 and all(watched)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_sharded_loading_equals_full_loading(tiny, family):
    """Two ranks: the meta-device loader that reads only each rank's rows gives bit-identical
    parameters and buffers to loading everything then sharding (FSDP2 and HSDP meshes), and an
    identical first GRPO step (rollout tokens, loss, grad norm, updated weights). The frozen reference
    is resharded after use and, in bf16, holds bf16 parameters whose log-probs equal the fp32-master
    policy's bf16 compute. Qwen3-VL too: its checkpoint's key names, q/k norms, DeepStack mergers and
    learned vision position embedding."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29571 + (family != "qwen2_vl")), "tests/sharded_load.py", tiny, family]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:]):
        assert {k: v for k, v in rank.items() if not k.endswith("dtype")} == {
            "family": family, "fsdp_params_equal": True, "fsdp_buffers_equal": True, "hsdp_params_equal": True,
            "hsdp_buffers_equal": True, "reference_resharded": True, "step_equal": True,
            "bf16_reference_equals_policy": True}
        assert rank["reference_dtype"] == "torch.bfloat16" and rank["policy_dtype"] == "torch.float32"
