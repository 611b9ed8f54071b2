"""Peak host memory a rank spends loading the policy: every rank loading the whole checkpoint then
sharding it (`--load full`, the old path) vs sbr's sharded loader (meta-device init, each rank reads
only its rows: sbr/sharded.py).

    python bench/load_memory.py [--hidden 1024 --layers 16 --world 2]

Builds a Qwen2-VL from config (Qwen2-VL's real vocabulary of 151,936, so the embedding and LM head are
the largest tensors, as at 7B), saves it as sharded bf16 safetensors (like the hub's), then for each
path launches `torchrun --nproc_per_node <world>` on this file, which builds a trainable policy as
train_grpo.py does (fp32 master weights, FSDP2, CPU) and reports its peak RSS (ru_maxrss) and its RSS
just before loading. Each path runs in fresh processes, so the two peaks do not mix.
Target for the sharded path: peak - baseline <= params/world + largest tensor + overhead, the
overhead being the slice read in the file's dtype beside its fp32 copy (<= half the largest tensor)
plus 128 MiB for allocator slack. The last line is one JSON object of the figures.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def build(folder: str, hidden: int, layers: int) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    heads = hidden // 128
    text = dict(vocab_size=151936, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=4, embed_dim=256, hidden_size=hidden, num_heads=4, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="300MB")


def worker(folder: str, load: str) -> None:
    """Under torchrun: load as train_grpo.py does, print this rank's figures as JSON."""
    import torch
    from sbr.common import init_distributed
    from sbr.training import build_policy
    d = init_distributed(always=True)
    before = rss_mib()
    policy = build_policy(folder, device=d.device, bf16=False, suppress=[], chunk=256, trainable=True,
                          activation_checkpointing=False, load=load)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    local = sum(p.to_local().numel() * p.element_size() for p in policy.parameters()) / 2**20
    total = sum(p.numel() * 4 for p in policy.parameters()) / 2**20
    largest = max(p.numel() * 4 for p in policy.parameters()) / 2**20
    print("RANK " + json.dumps({"rank": d.rank, "before_mib": before, "peak_mib": peak, "local_params_mib": local,
                                "params_mib": total, "largest_mib": largest}), flush=True)
    torch.distributed.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--folder", default=os.path.join(ROOT, "runs", "bench_load_model"))
    p.add_argument("--worker", default="")
    args = p.parse_args()
    if args.worker:
        return worker(args.folder, args.worker)
    if not os.path.exists(os.path.join(args.folder, "config.json")):
        build(args.folder, args.hidden, args.layers)
    figures = {}
    for load in ("full", "sharded"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.world), "--master_port",
               "29581", __file__, "--folder", args.folder, "--worker", load]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
        if run.returncode:
            sys.exit(run.stderr[-3000:])
        ranks = [json.loads(line[5:]) for line in run.stdout.splitlines() if line.startswith("RANK ")]
        figures[load] = ranks
        for r in sorted(ranks, key=lambda r: r["rank"]):
            print(f"{load:8s} rank {r['rank']}: RSS before loading {r['before_mib']:7.0f} MiB, peak {r['peak_mib']:7.0f} MiB "
                  f"(+{r['peak_mib'] - r['before_mib']:.0f}), its fp32 shards {r['local_params_mib']:.0f} MiB")
    params, largest = figures["sharded"][0]["params_mib"], figures["sharded"][0]["largest_mib"]
    full_peak = max(r["peak_mib"] for r in figures["full"])
    sharded_peak = max(r["peak_mib"] for r in figures["sharded"])
    sharded_over = max(r["peak_mib"] - r["before_mib"] for r in figures["sharded"])
    full_over = max(r["peak_mib"] - r["before_mib"] for r in figures["full"])
    bound = params / args.world + largest + largest / 2 + 128
    print(f"params {params:.0f} MiB fp32 ({params / 4 * 2**20 / 1e6:.0f}M), largest tensor {largest:.0f} MiB, world {args.world}")
    print(f"loading costs a rank: full +{full_over:.0f} MiB, sharded +{sharded_over:.0f} MiB "
          f"({full_over / sharded_over:.1f}x less); target for sharded <= {bound:.0f} MiB: "
          f"{'met' if sharded_over <= bound else 'NOT met'}")
    print(json.dumps({"full_peak_mib": round(full_peak), "sharded_peak_mib": round(sharded_peak),
                      "full_over_baseline_mib": round(full_over), "sharded_over_baseline_mib": round(sharded_over),
                      "params_mib": round(params), "largest_tensor_mib": round(largest), "bound_mib": round(bound),
                      "world_size": args.world}))


if __name__ == "__main__":
    main()
