"""Download SEED-Bench-R1, extract its archives where the loader looks, and check every record's media.

    python -m sbr.prepare --data_root /data/SEED-Bench-R1 --download true    # all three steps
    python -m sbr.prepare --data_root /data/SEED-Bench-R1                    # extract what is there, check
    python -m sbr.prepare --data_root D --delete_archives true --check_decode false

1. `--download true`: huggingface_hub's `snapshot_download` of the dataset repo into data_root. It
   skips files already complete, so a re-run after a broken connection resumes.
2. Every archive under videos/ or images/ (the Hub ships `videos/<source>/batch_N.tar.gz`) is streamed
   member by member (tarfile "r|*": one shard at a time, never a whole shard in memory). Each media
   member goes, flattened to its basename, where sbr.data looks: `videos/<source>/<name>` (by
   extension: a video) or `images/<source>/<name>` (an image), whatever folders it sat in inside the
   archive. <source> is the folder under videos/ or images/ that holds the archive (for an archive
   lying directly in videos/ or images/: the member's folder named after a known source). Safety, as
   tarfile's `data` filter and stricter: a member with `..`, an absolute path, a link or a device is
   refused, naming the archive and member; names are flattened, so nothing lands outside data_root.
   A member is written to a hidden temporary name and renamed (os.replace) when complete: a kill
   mid-member never leaves half a file under the final name. After a shard, a manifest
   `.sbr_prepare/<videos|images>--<source>--<shard>.done` lists what it placed; shards with one are
   skipped, so a re-run continues where a kill stopped. Two members of one source with the same
   basename and different bytes (one archive or two; the manifests remember earlier shards) are an
   error naming both archives; identical copies are skipped as duplicates. An archive is deleted only
   with `--delete_archives true`, and only after its manifest is written.
3. `--check true`: each annotation file the loaders read is checked: a Git LFS pointer is named with
   the fix; each record's media, resolved by sbr.data itself, must exist and decode (an image fully;
   a video cheaply: opened, its length read, its first and last frames decoded; `--check_decode
   false`: exists, is not empty and starts as its extension says). Problems print as
   `file:line: field: media: problem`, at most 10 a split, then a summary line per split. Any problem
   ends the run with `error: ...` and exit status 2.
"""
import os
import time
from dataclasses import dataclass

from sbr.archives import IMAGE_EXT, PrepareError, extract_all, is_lfs_pointer, say
from sbr.cli import parse, run
from sbr.data import MAGIC, DataError, load_seedbench, load_sft

REPO_ID = "TencentARC/SEED-Bench-R1"
# The files the loaders read (sbr.data), in annotations/, with the loader that reads each.
SPLITS = (("training_6k", load_seedbench), ("training_with_cot_6k", load_sft),
          ("validation_L1", load_seedbench), ("validation_L2", load_seedbench), ("validation_L3", load_seedbench))
SHOWN = 10                                        # problems printed a split, then "... and N more"


# ---------------------------------------------------------------------------- 1. download
def download(root: str) -> None:
    from huggingface_hub import snapshot_download       # lazily: only this step needs the hub
    say(f"downloading {REPO_ID} into {root} (resumes: files already complete are skipped)")
    try:
        snapshot_download(repo_id=REPO_ID, repo_type="dataset", local_dir=root)
    except OSError as e:          # network, disk, HTTP (HfHubHTTPError is an OSError)
        raise PrepareError(f"download of {REPO_ID} failed ({type(e).__name__}: {e}); "
                           "run the same command again to resume") from None


# ---------------------------------------------------------------------------- 3. check
def _probe_video(path: str) -> None:
    """Cheap decode: open, read the length and fps (the sampler's inputs), decode the first and last frames."""
    import decord
    from sbr.video import frame_indices
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)   # as sbr.video.read_video opens it
    total = len(reader)
    frame_indices(total, float(reader.get_avg_fps()))                    # raises on 0 frames or no fps
    reader.get_batch([0, total - 1]).asnumpy()


def media_problem(path: str, decode: bool) -> str | None:
    """What is wrong with one existing media file, or None."""
    if os.path.getsize(path) == 0:
        return "empty file"
    if not decode:                                # the first bytes, as sbr.data.media_problems reads them
        for extensions, (offset, magic) in MAGIC.items():
            if path.lower().endswith(extensions):
                with open(path, "rb") as f:
                    head = f.read(offset + len(magic))
                if head[offset:] != magic:
                    return f"does not start as a {extensions[0]} file does ({head[:12]!r})"
        return None
    from sbr.video import VideoError, load_image
    try:
        if path.lower().endswith(IMAGE_EXT):
            load_image(path)
        else:
            _probe_video(path)
    except VideoError as e:
        return str(e).removeprefix(f"{path}: ")
    except Exception as e:                        # decord's own errors, as sbr.video catches them
        return f"cannot read video ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def check_split(root: str, name: str, loader, decode: bool) -> int:
    """Check one annotation file and its records' media; print its problems and summary; the number of problems."""
    rel = f"annotations/{name}.jsonl"
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        say(f"{rel}: not found (--download true fetches it)")
        return 1
    if is_lfs_pointer(path):
        say(f"{rel}: a Git LFS pointer, not the annotations: run `git lfs pull` in {root}, or --download true")
        return 1
    start = time.time()
    try:
        samples = loader(path, root, on_missing="skip")   # the loader resolves the paths: what it finds is what trains
    except DataError as e:
        say(f"{rel}: cannot be read: {e}")
        return 1
    fields = ("video_basename", "current_observation_basename") if loader is load_seedbench else ("prompt", "prompt")
    problems = [(line, fields[0] if os.path.relpath(p, root).startswith("videos") else fields[1],
                 os.path.relpath(p, root), "not found") for line, p in samples.skipped]
    missing, ok = len(problems), 0
    for k, sample in enumerate(samples, 1):
        _, line, video_field, image_field = sample.source
        for media, field in ((sample.video, video_field), (sample.image, image_field)):
            if media:
                wrong = media_problem(media, decode)
                ok += wrong is None
                problems += [(line, field, os.path.relpath(media, root), wrong)] if wrong else []
        if k % 5000 == 0:
            say(f"  {rel}: {k}/{len(samples)} records checked")
    for line, field, media, wrong in sorted(problems)[:SHOWN]:
        say(f"  {rel}:{line}: {field}: {media}: {wrong}")
    if len(problems) > SHOWN:
        say(f"  ... and {len(problems) - SHOWN} more")
    bad = "undecodable" if decode else "empty or not media"
    say(f"{rel}: {len(samples) + len(samples.skipped)} records, {ok} media files ok, {missing} missing, "
        f"{len(problems) - missing} {bad} ({time.time() - start:.1f} s)")
    return len(problems)


def check(root: str, decode: bool = True) -> int:
    """Check every split; the number of problems (0: all present and readable)."""
    say(f"checking annotations and media under {root}" + ("" if decode else " (existence only: --check_decode false)"))
    return sum(check_split(root, name, loader, decode) for name, loader in SPLITS)


# ---------------------------------------------------------------------------- entry point
@dataclass
class Config:
    data_root: str = ""                  # the dataset folder (created by --download true)
    download: bool = False               # fetch TencentARC/SEED-Bench-R1 from the Hub first (resumes)
    delete_archives: bool = False        # delete each archive once it is extracted (its manifest written)
    check: bool = True                   # check every record's media after extracting
    check_decode: bool = True            # decode each media file (false: exists, not empty, right header)


def main(cfg: Config | list[str] | None = None) -> None:
    """Download, extract and check (`cfg`: a Config, or the flags as a list)."""
    if not isinstance(cfg, Config):
        cfg = parse(Config, cfg)
    root = cfg.data_root
    if not root:
        raise PrepareError("--data_root: expected the dataset folder (--download true creates it)")
    if cfg.download:
        download(root)
    if not os.path.isdir(root):
        raise PrepareError(f"--data_root {root}: not found; --download true fetches the dataset there")
    extract_all(root, cfg.delete_archives)
    if cfg.check:
        problems = check(root, cfg.check_decode)
        if problems:
            raise PrepareError(f"{problems} problem{'s' * (problems != 1)} in {root} (listed above): fetch what is "
                               "missing with --download true (it resumes) and run this again")
        say("all annotations read and all their media present" + (" and decodable" if cfg.check_decode else ""))


if __name__ == "__main__":
    run(main, Config)
