"""Extracting SEED-Bench-R1's archives where the loaders look (step 2 of `python -m sbr.prepare`).

Every archive under videos/ or images/ is streamed member by member (tarfile "r|*": one shard at a
time, never a whole shard in memory); each video or image member goes, flattened to its basename, to
`videos/<source>/<name>` or `images/<source>/<name>`. Unsafe members are refused, each member is
written to a temporary name and renamed when whole, and a manifest per finished shard
(`.sbr_prepare/<videos|images>--<source>--<shard>.done`, with each placed file's size) lets a rerun
skip it, or extract it again when a file it placed is missing or changed. sbr/prepare.py says it all.
"""
import filecmp
import json
import os
import re
import shutil
import tarfile
import time
import zlib

from sbr.common import UserError

STATE = ".sbr_prepare"                            # manifests of finished shards, inside data_root
ARCHIVES = (".tar.gz", ".tgz", ".tar")
VIDEO_EXT = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KNOWN_SOURCES = ("EpicKitchens", "Ego4D")         # the video_source values of the real files
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


class PrepareError(UserError):
    """A download, an archive or the media is not as it must be; the message says what to do."""


def say(*args) -> None:
    print(*args, flush=True)


def _natural(text: str) -> list:
    """Sort key putting batch_2 before batch_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def is_lfs_pointer(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(LFS_POINTER)) == LFS_POINTER

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
            owners.update({entry[1]: manifest["archive"] for entry in manifest["placed"]})
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
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp, size


def extract_archive(root: str, archive: str, owners: dict, sources: set) -> dict:
    """Place one archive's media members; write and return its manifest. `owners` gains its files."""
    path = os.path.join(root, archive)
    if is_lfs_pointer(path):
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
    except OSError as e:                          # the disk: full, read-only, no permission
        raise PrepareError(f"{archive}: cannot write under {root} ({e.strerror or e}; "
                           f"{_size(shutil.disk_usage(root).free)} free): free space or fix the folder's permissions "
                           "and run again (finished shards are kept)") from None
    manifest = {"archive": archive, "placed": [[m, d, n] for m, d, n in placed], "skipped": skipped,
                "bytes": sum(s for *_, s in placed)}
    target = _manifest_path(root, archive)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".tmp", "w") as f:
        json.dump(manifest, f, indent=0)
    os.replace(target + ".tmp", target)           # the shard counts as done only from here on
    owners.update({d: archive for _, d, _ in placed})
    return manifest


def _lost(root: str, archive: str) -> tuple[int, list[str] | None]:
    """(files its manifest lists, those missing now or of another size); (0, None) with no manifest
    (not extracted yet)."""
    path = _manifest_path(root, archive)
    if not os.path.exists(path):
        return 0, None
    with open(path) as f:
        placed = json.load(f)["placed"]
    return len(placed), [dest for _, dest, *size in placed if not os.path.isfile(os.path.join(root, dest))
                         or (size and os.path.getsize(os.path.join(root, dest)) != size[0])]


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
        start, (count, lost) = time.time(), _lost(root, archive)
        if lost is not None and (not lost or not os.path.exists(os.path.join(root, archive))):
            line = f"already done ({count} files placed before" + (
                f"; {len(lost)} of them missing or changed, e.g. {lost[0]}, and the archive gone: --download true "
                "fetches it again)" if lost else ")")
        else:
            if lost:
                say(f"{archive}: {len(lost)} of the files it placed are missing or changed (e.g. {lost[0]}): "
                    "extracting it again")
            m = extract_archive(root, archive, owners, sources)
            extracted += 1
            line = (f"{len(m['placed'])} files placed ({_size(m['bytes'])}), {len(m['skipped'])} skipped"
                    + (f" (e.g. {m['skipped'][0]})" if m["skipped"] else "") + f", {time.time() - start:.1f} s")
        if delete_archives and os.path.exists(os.path.join(root, archive)):   # only ever after its manifest
            os.remove(os.path.join(root, archive))
            line += "; archive deleted"
        say(f"[{i}/{len(archives)}] {archive}: {line}")
    return extracted
