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
import filecmp
import json
import os
import posixpath
import re
import shutil
import tarfile
import time
import zlib
from dataclasses import dataclass

from sbr.cli import parse, run
from sbr.common import UserError
from sbr.data import MAGIC, DataError, load_seedbench, load_sft

REPO_ID = "TencentARC/SEED-Bench-R1"
STATE = ".sbr_prepare"                            # manifests of finished shards, inside data_root
ARCHIVES = (".tar.gz", ".tgz", ".tar")
VIDEO_EXT = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KNOWN_SOURCES = ("EpicKitchens", "Ego4D")         # the video_source values of the real files
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
# The files the loaders read (sbr.data), in annotations/, with the loader that reads each.
SPLITS = (("training_6k", load_seedbench), ("training_with_cot_6k", load_sft),
          ("validation_L1", load_seedbench), ("validation_L2", load_seedbench), ("validation_L3", load_seedbench))
SHOWN = 10                                        # problems printed a split, then "... and N more"


class PrepareError(UserError):
    """A download, an archive or the media is not as it must be; the message says what to do."""


def say(*args) -> None:
    print(*args, flush=True)


def _natural(text: str) -> list:
    """Sort key putting batch_2 before batch_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _is_lfs_pointer(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(LFS_POINTER)) == LFS_POINTER


# ---------------------------------------------------------------------------- 1. download
def download(root: str) -> None:
    from huggingface_hub import snapshot_download       # lazily: only this step needs the hub
    say(f"downloading {REPO_ID} into {root} (resumes: files already complete are skipped)")
    try:
        snapshot_download(repo_id=REPO_ID, repo_type="dataset", local_dir=root)
    except OSError as e:          # network, disk, HTTP (HfHubHTTPError is an OSError)
        raise PrepareError(f"download of {REPO_ID} failed ({type(e).__name__}: {e}); "
                           "run the same command again to resume") from None


# ---------------------------------------------------------------------------- 2. extract
def find_archives(root: str) -> list[str]:
    """Archives under videos/ and images/, relative to root, videos first, batch numbers in order."""
    found = []
    for kind in ("videos", "images"):
        for folder, dirs, files in os.walk(os.path.join(root, kind)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.relpath(os.path.join(folder, f), root) for f in files
                      if f.endswith(ARCHIVES) and not f.startswith(".")]
    return sorted(found, key=lambda a: (not a.startswith("videos"), _natural(a)))


def _manifest_path(root: str, archive: str) -> str:
    """videos/EpicKitchens/batch_0.tar.gz -> <root>/.sbr_prepare/videos--EpicKitchens--batch_0.done"""
    name = archive.replace(os.sep, "/")
    for suffix in ARCHIVES:
        name = name.removesuffix(suffix)
    return os.path.join(root, STATE, name.replace("/", "--") + ".done")


def read_owners(root: str) -> dict[str, str]:
    """{placed file, relative to root: the archive it came from}, from every finished shard's manifest."""
    owners, state = {}, os.path.join(root, STATE)
    for name in sorted(os.listdir(state)) if os.path.isdir(state) else []:
        if name.endswith(".done"):
            with open(os.path.join(state, name)) as f:
                manifest = json.load(f)
            owners.update({dest: manifest["archive"] for _, dest in manifest["placed"]})
    return owners


def _refuse(archive: str, member: str, why: str) -> PrepareError:
    return PrepareError(f"{archive}: member {member!r} refused: {why}; nothing of it was written. "
                        "The archive is damaged or not the dataset's: delete it and fetch it again (--download true)")


def destination(root: str, archive: str, member: tarfile.TarInfo, sources: set) -> str | None:
    """Where a member goes, relative to root (`videos|images/<source>/<basename>`), or None to skip
    it (a folder, an AppleDouble `._` file, a file that is neither video nor image)."""
    name = member.name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or os.path.isabs(name):
        raise _refuse(archive, name, "an absolute path")
    if ".." in parts:
        raise _refuse(archive, name, "a '..' in its path")
    if member.isdir():
        return None
    if not member.isfile():
        kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else "device or fifo"
        raise _refuse(archive, name, f"a {kind} (only regular files are extracted)")
    try:
        tarfile.data_filter(member, root)         # the standard library's rules, on top of these
    except tarfile.FilterError as e:
        raise _refuse(archive, name, str(e)) from None
    base = parts[-1]
    ext = os.path.splitext(base)[1].lower()
    kind = "videos" if ext in VIDEO_EXT else "images" if ext in IMAGE_EXT else None
    if kind is None or base.startswith(".") or "__MACOSX" in parts:
        return None
    where = archive.split(os.sep)                 # videos/<source>/.../batch_N.tar.gz
    source = where[1] if len(where) >= 3 else next((p for p in reversed(parts[:-1]) if p in sources), None)
    if source is None:
        raise PrepareError(f"{archive}: cannot tell the video_source of member {name!r}: the archive lies directly "
                           f"in {where[0]}/ and no folder in the member's path is one of {sorted(sources)}; "
                           f"move the archive into {where[0]}/<video_source>/ and run again")
    return f"{kind}/{source}/{base}"


def _write_temp(src, final: str) -> tuple[str, int]:
    """Copy a member's bytes to a hidden temporary file beside `final` (same folder, so the rename is
    atomic); (temporary path, size). On any error, or a KeyboardInterrupt, the temporary is removed."""
    folder, base = os.path.split(final)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{base}.sbr-partial")
    size = 0
    try:
        with open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):     # 1 MiB at a time
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())                # the bytes are on disk before the name is
    except BaseException:
        os.remove(tmp)
        raise
    return tmp, size


def extract_archive(root: str, archive: str, owners: dict, sources: set) -> dict:
    """Place one archive's media members; write and return its manifest. `owners` gains its files."""
    path = os.path.join(root, archive)
    if _is_lfs_pointer(path):
        raise PrepareError(f"{archive} is a Git LFS pointer, not the archive: run `git lfs pull` in {root}, "
                           "or this command with --download true")
    need, free = os.path.getsize(path), shutil.disk_usage(root).free
    if free < 1.05 * need:                        # video and png bytes barely compress: out ~ in
        raise PrepareError(f"{archive}: {_size(free)} free in {root}, about {_size(need)} needed to extract it; "
                           "free some space (--delete_archives true removes each archive once extracted)")
    placed, skipped, here = [], [], {}            # here: {dest: member} within this archive
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                dest = destination(root, archive, member, sources)
                if dest is None:
                    if not member.isdir():
                        skipped.append(member.name)
                    continue
                final = os.path.join(root, dest)
                tmp, size = _write_temp(tar.extractfile(member), final)
                other = here.get(dest) or (owners.get(dest) if owners.get(dest) != archive else None)
                if other and os.path.exists(final):
                    if not filecmp.cmp(tmp, final, shallow=False):
                        os.remove(tmp)
                        first = f"{archive} (member {other!r})" if dest in here else other
                        raise PrepareError(f"{dest}: two different files of that name in source "
                                           f"{dest.split('/')[1]}: from {first} and from {archive} (member "
                                           f"{member.name!r}); the loader finds media by basename, so one would "
                                           "hide the other: ask the dataset's authors which is right")
                    os.remove(tmp)                # the same bytes again: a harmless duplicate
                    skipped.append(f"{member.name} (duplicate of {dest})")
                    continue
                os.replace(tmp, final)
                here[dest] = member.name
                placed.append((member.name, dest, size))
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise PrepareError(f"{archive}: cannot read the archive ({type(e).__name__}: {e}): it is truncated or "
                           "corrupt; delete it and run with --download true to fetch it again (what was "
                           "placed from it stays, and is redone)") from None
    manifest = {"archive": archive, "placed": [[m, d] for m, d, _ in placed], "skipped": skipped,
                "bytes": sum(s for *_, s in placed)}
    target = _manifest_path(root, archive)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".tmp", "w") as f:
        json.dump(manifest, f, indent=0)
    os.replace(target + ".tmp", target)           # the shard counts as done only from here on
    owners.update({d: archive for _, d, _ in placed})
    return manifest


def extract_all(root: str, delete_archives: bool = False) -> int:
    """Extract every archive not yet done, one line each; the number extracted in this run."""
    archives = find_archives(root)
    if not archives:
        say(f"no archives under {root}/videos or {root}/images: nothing to extract")
        return 0
    owners = read_owners(root)
    sources = set(KNOWN_SOURCES) | {d for kind in ("videos", "images") if os.path.isdir(os.path.join(root, kind))
                                    for d in os.listdir(os.path.join(root, kind))
                                    if os.path.isdir(os.path.join(root, kind, d))}
    extracted = 0
    for i, archive in enumerate(archives, 1):
        start, done = time.time(), os.path.exists(_manifest_path(root, archive))
        if done:
            with open(_manifest_path(root, archive)) as f:
                line = f"already done ({len(json.load(f)['placed'])} files placed before)"
        else:
            m = extract_archive(root, archive, owners, sources)
            extracted += 1
            line = (f"{len(m['placed'])} files placed ({_size(m['bytes'])}), {len(m['skipped'])} skipped"
                    + (f" (e.g. {m['skipped'][0]})" if m["skipped"] else "") + f", {time.time() - start:.1f} s")
        if delete_archives:                       # only ever after the manifest exists
            os.remove(os.path.join(root, archive))
            line += "; archive deleted"
        say(f"[{i}/{len(archives)}] {archive}: {line}")
    return extracted


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
    if _is_lfs_pointer(path):
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
