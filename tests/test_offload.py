"""--offload optimizer (sbr/offload.py): HostAdamW is torch's AdamW, bit for bit on the CPU, with its state
on the host; its state_dict is AdamW's (each loads the other's and goes on the same)."""
import copy

import pytest
import torch

from sbr.offload import HostAdamW, state_bytes


def pair(chunk: int):
    """The same parameters in torch's AdamW and in HostAdamW (two groups: with and without weight decay)."""
    torch.manual_seed(0)
    start = [torch.randn(5, 7), torch.randn(13), torch.randn(3, 2)]
    out = []
    for kind, extra in ((torch.optim.AdamW, {}), (HostAdamW, {"chunk": chunk})):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]
        out.append((params, kind(groups, lr=1e-2, weight_decay=0.1, **extra)))
    return out


def steps(runs, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        grads = [torch.randn(p.shape, generator=gen) for p in runs[0][0]]
        for params, opt in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()


def same(runs) -> bool:
    (a, opt_a), (b, opt_b) = runs
    state = all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for p, q in zip(a, b) for k in ("step", "exp_avg", "exp_avg_sq"))
    return state and all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("chunk", [6, 1 << 24])
def test_host_adamw_is_adamw_and_their_state_dicts_are_one(chunk):
    runs = pair(chunk)
    steps(runs, 4, seed=1)
    assert same(runs) and not torch.equal(runs[0][0][0], pair(chunk)[0][0][0])     # they moved, the same way
    assert state_bytes(runs[1][1]) == {"cpu": 8 * (35 + 13 + 6)}
    (a, adamw), (b, host) = runs
    for _, opt in runs:
        opt.param_groups[0]["lr"] = 5e-3         # as a schedule moves it: the state_dict carries it
    swapped = pair(chunk)                        # each resumes from the other's state_dict
    for (params, opt), (src_params, src) in zip(swapped, ((b, host), (a, adamw))):
        with torch.no_grad():
            for p, q in zip(params, src_params):
                p.copy_(q)
        opt.load_state_dict(copy.deepcopy(src.state_dict()))     # a checkpoint, not the live tensors
    assert swapped[1][1].param_groups[1]["weight_decay"] == 0.0 and state_bytes(swapped[1][1]) == {"cpu": 432}
    steps(runs, 3, seed=2)
    steps(swapped, 3, seed=2)
    assert same(swapped) and all(torch.equal(p, q) for p, q in zip(runs[0][0], swapped[0][0]))
