import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_rollout_gathers_parameters_once_not_per_token(tiny):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "tests/fsdp_gathers.py", tiny]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    per_forward, once = result["per_forward"], result["gathered"]
    assert per_forward["ids"] == once["ids"]                       # same completions either way
    assert once["all_gathers"] <= result["units"]                  # one per FSDP unit, at most
    assert per_forward["all_gathers"] >= 2 * 15                    # both decoder layers, every decoded token
