import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # a hub id must fail at once, never hang in retries
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The built-in tiny default (models, SEED-Bench-R1 layout, LongVideoBench), built once per run."""
    from sbr.tiny import ensure_tiny
    return ensure_tiny(str(tmp_path_factory.mktemp("tiny") / "tiny"))


@pytest.fixture(scope="session")
def processor(tiny):
    from sbr.model import load_processor
    return load_processor(os.path.join(tiny, "qwen2_vl"))
