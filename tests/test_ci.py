"""`.ci/run`, which the README offers to users, works in its own copy: it deletes nothing of theirs."""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_works_in_its_own_copy_of_the_checkout(tmp_path):
    repo = tmp_path / "checkout"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, ".ci", "run"), repo / ".ci" / "run")
    shutil.copy(os.path.join(ROOT, ".gitignore"), repo / ".gitignore")
    (repo / "train_grpo.py").write_text("tracked\n")
    (repo / "old.py").write_text("tracked\n")
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)   # noqa: E731
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    (repo / "mine.py").write_text("untracked, not ignored\n")
    for kept in ("runs/grpo/checkpoints/step_0000100/meta.json", ".venv/bin/python"):
        (repo / kept).parent.mkdir(parents=True, exist_ok=True)
        (repo / kept).write_text("the user's\n")
    (repo / "old.py").unlink()                            # deleted in the work tree: not copied, no error
    (repo / "train_grpo.py").write_text("edited\n")
    run = subprocess.run(["bash", ".ci/run"], cwd=repo, env={**os.environ, "SBR_CI_COPY_ONLY": "1"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    work = repo / ".ci" / "work"
    assert (work / "train_grpo.py").read_text() == "edited\n" and (work / "mine.py").exists()
    assert not (work / "old.py").exists()
    assert not (work / "runs").exists() and not (work / ".venv").exists()
    assert (repo / "runs/grpo/checkpoints/step_0000100/meta.json").read_text() == "the user's\n"
    assert (repo / ".venv/bin/python").exists()
