"""train_sft.py: the label mask token by token, the data format, a tiny run, and two ranks under torchrun."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

import train_sft
from sbr.collate import VideoCollator, responses
from sbr.data import DataError, load_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sft_records_load_with_absolute_media(tiny):
    root = os.path.join(tiny, "data")
    samples = load_sft(os.path.join(root, "annotations", "training_with_cot_6k.jsonl"), root)
    assert len(samples) == 16
    assert any(s.video is None for s in samples) and any(s.video is not None for s in samples)
    for s in samples:
        assert os.path.exists(s.image) and (s.video is None or os.path.exists(s.video))
        assert s.messages[0]["content"][-1]["type"] == "text" and "<answer>" in s.response


def test_loss_tokens_are_the_response_and_its_end_of_turn_only(tiny, processor):
    """Prompt ids + loss ids + "\\n" must be the chat template's whole conversation, token for token,
    and the loss ids exactly the response followed by <|im_end|>."""
    root = os.path.join(tiny, "data")
    sample = load_sft(os.path.join(root, "annotations", "training_with_cot_6k.jsonl"), root)[3]
    collator = VideoCollator(processor)
    prompt, target = collator.prompt_ids(sample), collator.response_ids(sample.response)
    tok = processor.tokenizer
    full = processor.apply_chat_template(sample.messages + [{"role": "assistant", "content": sample.response}],
                                         tokenize=False)
    assert prompt + target + tok("\n", add_special_tokens=False)["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(target) == sample.response + "<|im_end|>"
    assert target[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")          # the role header carries no loss
    # token by token, as the training forward sees them: loss exactly where the target tokens sit
    items = [collator.load(sample)]
    inputs = collator(items)
    ids, mask, cut = responses(collator, items, inputs["attention_mask"].sum(1).tolist(), 8192, "cpu")
    assert cut == 0 and ids[0].tolist() == target and mask[0].tolist() == [1] * len(target)
    short, short_mask, cut = responses(collator, items, inputs["attention_mask"].sum(1).tolist(),
                                                 inputs["attention_mask"].sum().item() + 5, "cpu")
    assert cut == 1 and short[0].tolist() == target[:5] and short_mask.sum() == 5


def test_malformed_sft_records(tmp_path):
    path = tmp_path / "cot.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": [{"type": "audio"}]}], "response": "x"}) + "\n")
    with pytest.raises(DataError, match="unknown content type") as err:
        load_sft(str(path), str(tmp_path))
    assert err.value.line == 1 and err.value.field == "prompt[0].content[0]"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="response"):
        load_sft(str(path), str(tmp_path))


def sft_run(tiny, out_dir, **kw):
    return replace(train_sft.tiny_config(), model=os.path.join(tiny, "qwen2_vl"),
                   data_root=os.path.join(tiny, "data"), out_dir=str(out_dir), **kw)


@pytest.fixture(scope="module")
def sft_history(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    return out, train_sft.main(sft_run(tiny, out))


def test_tiny_sft_lowers_the_loss_and_exports(sft_history):
    out, history = sft_history
    assert [h["step"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]                  # it learns the chains of thought
    assert all(h["response_tokens"] > 0 and h["grad_norm"] > 0 for h in history)
    for name in ("metrics.jsonl", "checkpoints/step_0000002/meta.json", "export/model.safetensors", "config.json"):
        assert os.path.exists(os.path.join(out, name)), name


@pytest.mark.slow
def test_two_rank_sft_matches_one_process(sft_history, tiny, tmp_path):
    _, history = sft_history
    cfg = sft_run(tiny, tmp_path, micro_batch_size=1, export=False, activation_checkpointing=True)
    args = [a for k, v in cfg.__dict__.items() for a in (f"--{k}", str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "train_sft.py", *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    two = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for a, b in zip(two, history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_sft_resumes_from_the_newest_complete_checkpoint_with_logs_once(sft_history, tiny, tmp_path):
    """Step 3's checkpoint lost (killed during its save): --resume goes back to step 2, recomputes
    step 3 equal to the uninterrupted run, and metrics.jsonl holds steps 1..3 once; exported in the
    base model's dtype (fp32 here)."""
    import shutil
    out, history = sft_history
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "checkpoints" / "step_0000003")
    (run / "checkpoints" / "latest").write_text("step_0000003")
    resumed = train_sft.main(sft_run(tiny, run, resume=True))
    assert [h["step"] for h in resumed] == [3] and resumed[0]["loss"] == pytest.approx(history[2]["loss"], rel=1e-5)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.load(open(run / "export" / "config.json"))["dtype"] == "float32"


def test_a_batch_larger_than_the_data_names_the_flag(tiny, tmp_path):
    from sbr.common import ConfigError
    with pytest.raises(ConfigError, match=r"--batch_size 128: .* has 16 examples, fewer than one step takes"):
        train_sft.main(sft_run(tiny, tmp_path, batch_size=128, micro_batch_size=1))
