"""sbr.prepare: archives in any nesting end up where sbr.data looks; re-runs continue; bad archives and
missing media are named. The dataset is sbr.tiny's (real .mp4/.png in the real layout), re-packed
into shards the way the Hub might ship them; the download is a fake that writes those shards."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from sbr import archives, prepare
from sbr.data import load_seedbench, load_sft
from sbr.prepare import PrepareError

SPLITS = ["training_6k", "validation_L1", "validation_L2", "validation_L3"]


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """sbr.tiny's dataset, already extracted: the reference every prepared copy must match."""
    from sbr.tiny import build_dataset
    return build_dataset(str(tmp_path_factory.mktemp("flat") / "data"))


def make_tar(path, members, mode="w:gz"):
    """members: [(name inside the archive, bytes | a file to add | a TarInfo)]."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, what in members:
            if isinstance(what, tarfile.TarInfo):
                what.name = name
                tar.addfile(what)
            elif isinstance(what, bytes):
                info = tarfile.TarInfo(name)
                info.size = len(what)
                tar.addfile(info, io.BytesIO(what))
            else:
                tar.add(what, arcname=name)


def shard(flat, root):
    """The tiny dataset as shards, each nested differently; annotations as plain files."""
    def files(kind, source):
        folder = os.path.join(flat, kind, source)
        return sorted(os.path.join(folder, f) for f in os.listdir(folder))
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for f in os.listdir(os.path.join(flat, "annotations")):
        with open(os.path.join(flat, "annotations", f), "rb") as src:
            open(os.path.join(root, "annotations", f), "wb").write(src.read())
    ek, ego = files("videos", "EpicKitchens"), files("videos", "Ego4D")
    ego_images, half = files("images", "Ego4D"), len(ek) // 2
    v = os.path.join(root, "videos")
    make_tar(f"{v}/EpicKitchens/batch_0.tar.gz", [(f"batch_0/{os.path.basename(p)}", p) for p in ek[:half]])
    make_tar(f"{v}/EpicKitchens/batch_1.tar.gz", [(os.path.basename(p), p) for p in ek[half:-1]]   # flat,
             + [(f"./deep/er/{os.path.basename(ek[-1])}", ek[-1]), ("README.txt", b"not media")])  # deep, junk
    # a video shard that holds images too, under the full layout's folders
    make_tar(f"{v}/Ego4D/batch_0.tar.gz", [(f"videos/Ego4D/{os.path.basename(p)}", p) for p in ego]
             + [(f"images/Ego4D/{os.path.basename(p)}", p) for p in ego_images[:3]])
    # an archive lying directly in images/: the source comes from the member's folders
    make_tar(f"{root}/images/Ego4D_images.tar.gz", [(f"data/images/Ego4D/{os.path.basename(p)}", p) for p in ego_images[3:]])
    make_tar(f"{root}/images/EpicKitchens/batch_0.tar.gz",
             [(f"EpicKitchens/{os.path.basename(p)}", p) for p in files("images", "EpicKitchens")], mode="w")
    return root


ARCHIVES = ["videos/Ego4D/batch_0.tar.gz", "videos/EpicKitchens/batch_0.tar.gz", "videos/EpicKitchens/batch_1.tar.gz",
            "images/Ego4D_images.tar.gz", "images/EpicKitchens/batch_0.tar.gz"]


def placed_files(root):
    """Every media file under videos/ and images/ (hidden temporaries included), relative to root."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for kind in ("videos", "images")
                  for d, _, fs in os.walk(os.path.join(root, kind)) for f in fs if not f.endswith((".tar.gz", ".tar")))


def test_download_extract_check_and_the_loader_finds_every_file(flat, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return shard(flat, kwargs["local_dir"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    root = str(tmp_path / "data")
    prepare.main(["--data_root", root, "--download", "true"])
    out = capsys.readouterr().out
    assert calls == [{"repo_id": "TencentARC/SEED-Bench-R1", "repo_type": "dataset", "local_dir": root}]
    assert archives.find_archives(root) == ARCHIVES
    for i, archive in enumerate(ARCHIVES, 1):
        assert f"[{i}/5] {archive}: " in out and os.path.exists(os.path.join(root, archive))   # archives stay
    assert "1 skipped (e.g. README.txt)" in out and "all annotations read and all their media present and decodable" in out
    for split in SPLITS:
        assert f"annotations/{split}.jsonl: " in out and "0 missing, 0 undecodable" in out
        samples = load_seedbench(os.path.join(root, "annotations", f"{split}.jsonl"), root)   # on_missing="error"
        assert samples and all(os.path.isfile(p) for s in samples for p in (s.video, s.image) if p)
    assert len(load_sft(os.path.join(root, "annotations", "training_with_cot_6k.jsonl"), root)) == 16
    # exactly the flat dataset's media, byte for byte, and nothing else (no README, no temporaries)
    assert placed_files(root) == placed_files(flat)
    for rel in placed_files(flat):
        assert open(os.path.join(root, rel), "rb").read() == open(os.path.join(flat, rel), "rb").read()


def test_a_rerun_skips_the_shards_already_done(flat, tmp_path, capsys):
    root = shard(flat, str(tmp_path / "data"))
    assert prepare.extract_all(root) == 5
    mtimes = {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in placed_files(root)}
    capsys.readouterr()
    assert prepare.extract_all(root) == 0
    out = capsys.readouterr().out
    assert out.count("already done") == 5
    assert {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in placed_files(root)} == mtimes


def test_a_kill_mid_shard_leaves_no_half_file_and_the_rerun_finishes_it(tmp_path):
    root, a, b = str(tmp_path / "data"), os.urandom(300_000), os.urandom(300_000)   # incompressible
    archive = os.path.join(root, "videos", "EpicKitchens", "batch_0.tar.gz")
    make_tar(archive, [("batch_0/a.mp4", a), ("batch_0/b.mp4", b)])
    full = open(archive, "rb").read()
    open(archive, "wb").write(full[:450_000])                     # the stream ends inside b.mp4
    with pytest.raises(PrepareError, match=r"videos/EpicKitchens/batch_0\.tar\.gz: cannot read the archive"):
        prepare.extract_all(root)
    assert placed_files(root) == ["videos/EpicKitchens/a.mp4"]    # b: neither a final nor a temporary name
    assert not os.path.exists(os.path.join(root, ".sbr_prepare", "videos--EpicKitchens--batch_0.done"))
    open(archive, "wb").write(full)                               # fetched again
    assert prepare.extract_all(root) == 1
    assert placed_files(root) == ["videos/EpicKitchens/a.mp4", "videos/EpicKitchens/b.mp4"]
    assert open(os.path.join(root, "videos/EpicKitchens/b.mp4"), "rb").read() == b
    manifest = json.load(open(os.path.join(root, ".sbr_prepare", "videos--EpicKitchens--batch_0.done")))
    assert manifest["placed"] == [["batch_0/a.mp4", "videos/EpicKitchens/a.mp4", len(a)],
                                  ["batch_0/b.mp4", "videos/EpicKitchens/b.mp4", len(b)]]
    os.remove(os.path.join(root, "videos/EpicKitchens/a.mp4"))     # lost after extraction: a rerun restores it
    open(os.path.join(root, "videos/EpicKitchens/b.mp4"), "r+b").truncate(10)
    assert prepare.extract_all(root) == 1
    assert [open(os.path.join(root, f"videos/EpicKitchens/{n}.mp4"), "rb").read() for n in "ab"] == [a, b]


def _special(kind):
    info = tarfile.TarInfo()
    info.type, info.linkname = {"symlink": (tarfile.SYMTYPE, "/etc/passwd"), "hardlink": (tarfile.LNKTYPE, "ok.mp4"),
                                "device": (tarfile.CHRTYPE, "")}[kind]
    return info


@pytest.mark.parametrize("name, what, why", [
    ("../../evil.mp4", b"x", "'..'"), ("batch_0/../../../evil.mp4", b"x", "'..'"), ("/tmp/evil.mp4", b"x", "absolute"),
    ("evil.mp4", _special("symlink"), "symbolic link"), ("evil.mp4", _special("hardlink"), "hard link"),
    ("evil.mp4", _special("device"), "device")])
def test_unsafe_members_are_refused_by_archive_and_member(tmp_path, name, what, why):
    root = str(tmp_path / "inside" / "data")
    make_tar(os.path.join(root, "videos", "Ego4D", "batch_3.tar.gz"), [("ok.mp4", b"fine"), (name, what)])
    with pytest.raises(PrepareError) as e:
        prepare.extract_all(root)
    assert f"videos/Ego4D/batch_3.tar.gz: member {name!r} refused" in str(e.value) and why in str(e.value)
    everything = [f for d, _, fs in os.walk(tmp_path) for f in fs]
    assert "evil.mp4" not in everything and not any(f.endswith(".sbr-partial") for f in everything)


def test_same_basename_with_other_bytes_names_both_archives_even_across_runs(tmp_path):
    root = str(tmp_path / "data")
    ek = os.path.join(root, "videos", "EpicKitchens")
    make_tar(f"{ek}/batch_0.tar.gz", [("batch_0/x.mp4", b"first"), ("batch_0/y.mp4", b"same")])
    prepare.extract_all(root)                                     # batch_0 done; its manifest remembers x.mp4
    make_tar(f"{ek}/batch_1.tar.gz", [("y.mp4", b"same")])       # an identical copy: a harmless duplicate
    prepare.extract_all(root)
    make_tar(f"{ek}/batch_2.tar.gz", [("batch_2/x.mp4", b"second")])
    with pytest.raises(PrepareError) as e:
        prepare.extract_all(root)
    message = str(e.value)
    assert "videos/EpicKitchens/x.mp4: two different files" in message
    assert "videos/EpicKitchens/batch_0.tar.gz" in message and "videos/EpicKitchens/batch_2.tar.gz" in message
    assert open(f"{ek}/x.mp4", "rb").read() == b"first"           # the first stays, nothing overwritten
    # within one archive: both members named
    make_tar(f"{root}/videos/Ego4D/batch_0.tar.gz", [("a/z.mp4", b"one"), ("b/z.mp4", b"two")])
    os.remove(f"{ek}/batch_2.tar.gz")
    with pytest.raises(PrepareError, match=r"videos/Ego4D/batch_0\.tar\.gz \(member 'a/z\.mp4'\).*member 'b/z\.mp4'"):
        prepare.extract_all(root)


def test_git_lfs_pointers_are_named_with_the_fix(flat, tmp_path, capsys):
    root = shard(flat, str(tmp_path / "data"))
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 123456\n"
    open(os.path.join(root, "annotations", "validation_L2.jsonl"), "w").write(pointer)
    prepare.extract_all(root)
    assert prepare.check(root, decode=False) == 1
    assert "annotations/validation_L2.jsonl: a Git LFS pointer, not the annotations: run `git lfs pull`" in capsys.readouterr().out
    open(os.path.join(root, "videos", "Ego4D", "batch_9.tar.gz"), "w").write(pointer)   # an archive, too
    with pytest.raises(PrepareError, match=r"videos/Ego4D/batch_9\.tar\.gz is a Git LFS pointer.*git lfs pull"):
        prepare.extract_all(root)


def test_missing_and_undecodable_media_are_counted_and_named_by_file_line(flat, tmp_path, capsys):
    import shutil
    root = str(tmp_path / "data")
    shutil.copytree(flat, root)
    os.remove(os.path.join(root, "videos/EpicKitchens/validation_L1_001.mp4"))          # record 1: line 2
    open(os.path.join(root, "images/EpicKitchens/validation_L1_003.png"), "wb").write(b"\x89PNG\r\n\x1a\n broken")
    for i in range(16):                                                                 # every training image
        os.remove(os.path.join(root, f"images/EpicKitchens/training_6k_{i:03d}.png"))
    with pytest.raises(PrepareError, match="problems in"):
        prepare.main(["--data_root", root])
    out = capsys.readouterr().out
    assert ("annotations/validation_L1.jsonl:2: video_basename: videos/EpicKitchens/validation_L1_001.mp4: not found"
            in out)
    assert "annotations/validation_L1.jsonl:4: current_observation_basename: images/EpicKitchens/validation_L1_003.png: cannot read image" in out
    assert "annotations/validation_L1.jsonl: 8 records, 11 media files ok, 1 missing, 1 undecodable" in out
    assert "annotations/training_6k.jsonl:1: current_observation_basename: images/EpicKitchens/training_6k_000.png: not found" in out
    assert "  ... and 6 more" in out and "annotations/training_6k.jsonl: 16 records, 0 media files ok, 16 missing" in out
    # the script: one line on stderr, status 2, no traceback
    run = subprocess.run([sys.executable, "-m", "sbr.prepare", "--data_root", root, "--check_decode", "false"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 2 and run.stderr.startswith("error: 33 problems") and "Traceback" not in run.stderr
    assert "1 missing, 0 empty or not media" in run.stdout       # a broken png that starts right passes the fast check


def test_delete_archives_deletes_only_the_shards_done(flat, tmp_path):
    root = shard(flat, str(tmp_path / "data"))
    last = os.path.join(root, ARCHIVES[-1])
    open(last, "r+b").truncate(os.path.getsize(last) // 2)       # the last shard breaks mid-way
    with pytest.raises(PrepareError, match="images/EpicKitchens/batch_0.tar.gz: cannot read"):
        prepare.main(["--data_root", root, "--delete_archives", "true"])
    assert [os.path.exists(os.path.join(root, a)) for a in ARCHIVES] == [False, False, False, False, True]
    assert len(os.listdir(os.path.join(root, ".sbr_prepare"))) == 4
