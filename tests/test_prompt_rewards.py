import pytest

from sbr.data import Sample
from sbr.prompt import build_messages, build_question, reference_answer
from sbr.rewards import RECORD, REWARDS, accuracy_reward, answer_token_mask, extract_answer, format_reward, get_reward

SAMPLE = Sample(sample_id=3, question="Considering the progress shown in the video and my current observation "
                "shown in the image, what action should I take next in order to make tea?",
                options=["boil water", "take cup", "pour water", "add milk"], answer="B",
                video="/d/videos/EpicKitchens/v.mp4", image="/d/images/EpicKitchens/i.png", level="L1")


def test_question_text_is_byte_exact():
    expected = (b"Considering the progress shown in the video and my current observation shown in the image, "
                b"what action should I take next in order to make tea?\n"
                b"A. boil water\nB. take cup\nC. pour water\nD. add milk\n"
                b" Output the thinking process in <think> </think> and final answer in <answer> </answer> tags, "
                b"i.e., <think> reasoning process here </think><answer> answer here </answer>. ")
    assert build_question(SAMPLE).encode() == expected
    assert build_question(SAMPLE).endswith("</answer>. ")           # the authors' trailing space
    assert reference_answer(SAMPLE) == "<answer>B.</answer>"


def test_messages_order_video_image_text_and_no_video_without_progress():
    [turn] = build_messages(SAMPLE)
    assert turn["role"] == "user"
    assert [c["type"] for c in turn["content"]] == ["video", "image", "text"]
    assert turn["content"][0]["video"] == SAMPLE.video and turn["content"][2]["text"] == build_question(SAMPLE)
    no_progress = Sample(**{**SAMPLE.__dict__, "video": None})
    assert [c["type"] for c in build_messages(no_progress)[0]["content"]] == ["image", "text"]


def test_chat_text_uses_the_template_default_system_prompt(processor):
    text = processor.apply_chat_template(build_messages(SAMPLE), tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
                    + build_question(SAMPLE) + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("text, letter", [
    ("<think>x</think><answer>B</answer>", "B"),
    ("<think>x</think><answer> B. open drawer</answer>", "B"),
    ("<answer>\n  c \n</answer>", "C"),                 # lowercase and whitespace tolerated
    ("<answer>D.</answer> then <answer>A</answer>", "D"),  # the first tag counts
    ("<answer></answer>", None),
    ("<answer>   </answer>", None),
    ("The answer is B", None),
    ("<answer>E</answer>", None),                       # not an option of a 4-way question
    ("<answer>(B)</answer>", None),                     # first character, as the authors score it
    ("<answer>B", None),                                # unclosed
])
def test_extract_answer(text, letter):
    assert extract_answer(text) == letter


def test_rewards():
    assert accuracy_reward("<think>a</think><answer>B. take cup</answer>", "B") == 1.0
    assert accuracy_reward("<answer>A</answer>", "B") == 0.0
    assert accuracy_reward("B", "B") == 0.0                       # no tag, no reward
    assert accuracy_reward("<answer>E</answer>", "E") == 1.0      # LongVideoBench has a fifth option
    assert format_reward("<think> a </think>\n<answer>B</answer>", "B") == 1.0
    assert format_reward("<answer>B</answer>", "B") == 0.0
    assert format_reward("hmm <think>a</think><answer>B</answer>", "B") == 0.0
    assert {"accuracy", "format", "accuracy_exact", "format_full"} <= set(REWARDS) and get_reward("accuracy") is accuracy_reward
    with pytest.raises(KeyError, match="registered"):
        get_reward("length")


def test_answer_token_mask_covers_the_answer_the_reward_reads(processor):
    """The tokens of the first <answer>...</answer>'s content, however the tokenizer splits the tags;
    padding past the completion and rows with no (or an empty) tag get none."""
    import torch
    tok = processor.tokenizer
    texts = ["<think>open the drawer</think> <answer>B</answer>", "<think>x</think><answer> C. cut</answer> <answer>D</answer>",
             "no tag here", "<answer></answer>"]
    enc = [tok(t, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")] for t in texts]
    C = max(map(len, enc)) + 3
    ids = torch.tensor([e + [tok.pad_token_id] * (C - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (C - len(e)) for e in enc])
    m = answer_token_mask(tok, ids, mask)
    assert [tok.decode(ids[r][m[r].bool()]) for r in range(4)] == ["B", " C. cut", "", ""]
    assert (m * (1 - mask)).sum() == 0


def test_rewards_take_the_record_they_name():
    from types import SimpleNamespace
    from sbr.rewards import bind
    s = SimpleNamespace(sample_id=7, question="make tea", options=["a", "b", "c", "d"], answer="B", level="L3",
                        domain="Work", video="v.mp4", image="i.png")
    assert bind(lambda c, a: float(a == "B"))("x", s) == 1.0
    assert bind(lambda c, a, *, options, level: len(options) + (level == "L3"))("x", s) == 5.0
    assert bind(lambda c, a, **record: float(sorted(record) == sorted(RECORD)))("x", s) == 1.0
    assert bind(lambda c, a, scale=2.0: scale)("x", s) == 2.0               # its own defaulted argument: left alone
    with pytest.raises(TypeError, match="gold is not one"):
        bind(lambda c, a, *, gold: 0.0)
    with pytest.raises(ValueError, match="returned nan for question 7"):
        bind(lambda c, a: float("nan"))("x", s)


def test_a_reward_module_given_as_a_file(tmp_path):
    from sbr.rewards import load_module
    (tmp_path / "my_rewards.py").write_text("from sbr.rewards import register\n\n"
                                            "@register('from_a_file')\ndef r(completion, answer):\n    return 0.5\n")
    load_module(str(tmp_path / "my_rewards.py"))
    try:
        assert get_reward("from_a_file")("", "A") == 0.5
    finally:
        REWARDS.pop("from_a_file")


def test_grpo_care_rewards_and_answer_tokens_as_released(processor):
    """The authors' accuracy (exact stripped tag content), format (the whole completion) and answer
    mask (from the opening tag's "answer" token to three tokens before the end), beside sbr's."""
    import torch
    from sbr.rewards import accuracy_exact_reward, accuracy_reward, authors_answer_mask, format_full_reward, format_reward
    assert accuracy_exact_reward("<think>x</think><answer> B </answer>", "B") == 1.0
    assert accuracy_exact_reward("<answer>B. open drawer</answer>", "B") == 0.0 == accuracy_exact_reward("<answer>b</answer>", "B")
    assert accuracy_reward("<answer>B. open drawer</answer>", "B") == 1.0 == accuracy_reward("<answer>b</answer>", "B")
    assert format_full_reward("<think>x</think> <answer>B</answer>", "B") == 1.0
    assert format_full_reward("<think>x</think><answer>B</answer> and more", "B") == 0.0
    assert format_reward("<think>x</think><answer>B</answer> and more", "B") == 1.0
    tok = processor.tokenizer
    ids = tok("<think>go</think><answer>B</answer>")["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    tokens = tok.convert_ids_to_tokens(ids)
    mask = authors_answer_mask(tok, torch.tensor([ids, ids]), torch.tensor([[1] * len(ids), [1] * 3 + [0] * (len(ids) - 3)]))
    opening = max(i for i, t in enumerate(tokens) if "answer" in t and "<answer>" in "".join(tokens[max(i - 1, 0):i + 2]))
    assert mask[0].tolist() == [int(opening < i < len(ids) - 3) for i in range(len(ids))] and mask[0].sum() > 0
    assert "B" in tok.decode([i for i, m in zip(ids, mask[0].tolist()) if m]) and not mask[1].any()
