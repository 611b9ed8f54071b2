"""Pictures of where the reasoning looks, like the paper's Figures 4-6 (sbr/attention.py measures it):
the sampled frames, two a temporal grid, and the observation image, each with its attention map
overlaid (one colour scale for the whole picture, so panels compare), the video's share by grid as bars,
and the completion beneath, marked correct or not. Needs matplotlib (the `plot` extra)."""
import os
import textwrap

import numpy as np


def attention_picture(item: dict, rec: dict, completion: str, out_png: str) -> str:
    """item: sbr.collate.VideoCollator.load's (frames (T, 3, H, W) uint8, image (3, H, W)); rec: an
    attention record with video_maps / image_map. Writes and returns out_png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    frames = item["frames"]
    maps = [np.asarray(m) for m in rec.get("video_maps", [])]
    panels = [(frames[2 * g].permute(1, 2, 0).numpy(), m, f"frames {2 * g + 1}-{2 * g + 2}")
              for g, m in enumerate(maps)] if frames is not None else []
    if item["image"] is not None and rec.get("image_map") is not None:
        panels.append((item["image"].permute(1, 2, 0).numpy(), np.asarray(rec["image_map"]), "observation"))
    top = max([m.max() for _, m, _ in panels] + [1e-12])
    cols = max(len(panels), 1)
    fig = plt.figure(figsize=(2.2 * cols, 5.2))
    grid = fig.add_gridspec(3, cols, height_ratios=[2.2, 1.0, 1.6], hspace=0.6)   # the bars' x label clear of the text
    for k, (picture, m, title) in enumerate(panels):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(picture)
        h, w = picture.shape[:2]
        shown = ax.imshow(m, cmap="inferno", alpha=0.55, vmin=0, vmax=top, extent=(0, w, h, 0), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    if panels:
        fig.colorbar(shown, ax=fig.axes, fraction=0.02, label="attention share a merged token")
    bars = fig.add_subplot(grid[1, :])
    video = rec.get("video") or []
    bars.bar(range(1, len(video) + 1), video, color="tab:orange")
    bars.set_xticks(range(1, len(video) + 1))
    bars.set_xlabel("temporal grid (2 frames each, in time order)")
    bars.set_ylabel("share of attention")
    bars.set_title(f"video {sum(video):.3f}, image {rec.get('image') or 0:.3f}, text {rec['text']:.3f} "
                   f"(over {rec['tokens']} generated tokens)", fontsize=8)
    note = fig.add_subplot(grid[2, :])
    note.axis("off")
    verdict = "correct" if rec.get("correct") else "wrong"
    note.text(0, 0.8, f"{rec['split']} {rec['sample_id']} ({verdict})\n" + "\n".join(textwrap.wrap(completion, 110)[:8]),
              va="top", fontsize=7, family="monospace")
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png
