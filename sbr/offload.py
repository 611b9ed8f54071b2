"""`--offload optimizer`: AdamW whose state lives in host memory and passes through the GPU a chunk at a time.

Full fine-tuning keeps 16 bytes a parameter per GPU shard: the fp32 master (4), its gradient (4) and
AdamW's exp_avg and exp_avg_sq (8). `--offload params` (FSDP2's CPUOffloadPolicy, sbr/fsdp.py) moves all
16 to the host and steps on the CPU; this moves the 8 bytes of AdamW state only and steps on the GPU:

    for each trained parameter, each chunk of CHUNK elements of its shard:
        m, v  <- host exp_avg, exp_avg_sq                     (pinned, non-blocking copies)
        w     <- w (1 - lr wd)                                (decoupled weight decay)
        m     <- m + (1 - b1) (g - m)                         (lerp)
        v     <- b2 v + (1 - b2) g^2
        w     <- w - lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        host exp_avg, exp_avg_sq <- m, v

in torch.optim.AdamW's own operations and order (its single-tensor path), so the step is AdamW's, bit
for bit where torch picks that path (the CPU; a test compares them); on a GPU torch picks its foreach
path, the same arithmetic element by element. The state has AdamW's keys, shapes and layout (DTensors
with host local tensors under FSDP2), so a DCP checkpoint is the same either way: a run saved with
`--offload none` resumes with `--offload optimizer` and back.

At 7B (8.29B parameters) on 8 x 40 GB: 8P/S = 8.29 GB a GPU leaves it (66 GB of pinned host memory a
node); each optimizer step copies it in and out, 16.6 GB over a GPU's PCIe link (~0.8 s at 20 GB/s,
against a GRPO step of minutes), and holds 3 chunks on the GPU (m, v, the denominator: 3 x 64 MB). On
one 80 GB GPU it is 66 GB each way (~6.6 s a step). Not measured on a GPU yet (bench/gpu_check.py).
"""
from collections import defaultdict

import torch

from sbr.fsdp import local

CHUNK = 1 << 24          # elements: m, v and the denominator of one chunk are 3 x 64 MB on the GPU


def _flat(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` as one flat view (in place updates reach `t`)."""
    data = local(t)
    if not data.is_contiguous():
        raise RuntimeError(f"sbr.offload: a parameter shard of shape {tuple(data.shape)} is not contiguous")
    return data.view(-1)


class HostAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (same arguments, state_dict and schedulers) with its state in host memory."""

    def __init__(self, params, *, chunk: int = CHUNK, **kwargs):
        super().__init__(params, **kwargs)
        self.chunk = chunk
        if any(g["amsgrad"] or g["maximize"] for g in self.param_groups):
            raise ValueError("HostAdamW: amsgrad and maximize are not supported")

    @staticmethod
    def _host(like: torch.Tensor) -> torch.Tensor:
        """Zeros on the host, laid out as `like` (a DTensor of the same mesh and placements under FSDP2)."""
        data = torch.zeros(local(like).shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())
        if not hasattr(like, "device_mesh"):
            return data
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(data, like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HostAdamW.step takes no closure")
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=self._host(p), exp_avg_sq=self._host(p))
                state["step"] += 1
                t = state["step"].item()
                step_size, bc2_sqrt = lr / (1 - b1**t), (1 - b2**t) ** 0.5
                for w, g, m_host, v_host in zip(*(_flat(x).split(self.chunk) for x in
                                                  (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))):
                    m, v = m_host.to(w.device, non_blocking=True), v_host.to(w.device, non_blocking=True)
                    if wd != 0:
                        w.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    w.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
                    if m is not m_host:                  # on the CPU they are the host tensors themselves
                        m_host.copy_(m, non_blocking=True)
                        v_host.copy_(v, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()                     # the host copies are complete before anyone reads them
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """Optimizer.load_state_dict moves every state tensor to its parameter's device at once: the whole
        AdamW state on the GPU for a moment (61 GB for 7B on one GPU), which is what this class avoids.
        This maps the saved parameters to this optimizer's by order, as it does, keeping the state on the host."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the checkpoint's optimizer state is for other parameters than this run's")
        params = dict(zip((k for g in saved for k in g["params"]), (p for g in self.param_groups for p in g["params"])))
        state = defaultdict(dict)
        for key, values in state_dict["state"].items():
            p = params[key]
            state[p] = {name: v.detach().clone() if name == "step" else self._on_host(v, p) for name, v in values.items()}
        groups = [{**g, **{k: v for k, v in s.items() if k != "params"}, "params": g["params"]}
                  for s, g in zip(saved, self.param_groups)]
        self.__setstate__({"state": state, "param_groups": groups})

    def _on_host(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        data = local(value)
        if data.device.type == "cpu" and (data.is_pinned() or not torch.cuda.is_available()):
            return value                                 # what dcp.load just filled: the host state itself
        host = self._host(like)
        local(host).copy_(data)
        return host


def state_bytes(optimizer) -> dict:
    """Bytes of AdamW state by device type ("cpu", "cuda"): what a test or bench reads to see where it lives."""
    out = defaultdict(int)
    for state in optimizer.state.values():
        for name, value in state.items():
            if name != "step":
                data = local(value)
                out[data.device.type] += data.numel() * data.element_size()
    return dict(out)

