"""The exact SEED-Bench-R1 prompt, built into Qwen chat messages.

User turn: the progress video (only when there is progress), the current observation image, then
    {question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n Output the thinking process ... </answer>. 
(the trailing space is in the authors' template). No system prompt of our own: the chat template's
default. The reference answer is `<answer>{letter}.</answer>`.
"""
from sbr.data import LETTERS, Sample

R1_SUFFIX = (" Output the thinking process in <think> </think> and final answer in <answer> </answer> tags, "
             "i.e., <think> reasoning process here </think><answer> answer here </answer>. ")


def build_question(sample: Sample) -> str:
    """The full user text: question, lettered options one a line, the R1 suffix."""
    options = "".join(f"{LETTERS[i]}. {text}\n" for i, text in enumerate(sample.options))
    return f"{sample.question}\n{options}{R1_SUFFIX}"


def build_messages(sample: Sample) -> list[dict]:
    """Qwen chat messages; media entries carry their paths (the collator feeds the pixels itself)."""
    content = []
    if sample.video is not None:
        content.append({"type": "video", "video": sample.video})
    if sample.image is not None:
        content.append({"type": "image", "image": sample.image})
    content.append({"type": "text", "text": build_question(sample)})
    return [{"role": "user", "content": content}]


def reference_answer(sample: Sample) -> str:
    return f"<answer>{sample.answer}.</answer>"


def fingerprint(processor) -> str:
    """sha256 of a fixed question rendered through this code and the model's chat template: changes
    whenever what a model is asked changes, whichever of the two changed."""
    import hashlib
    sample = Sample("fingerprint", "What should I do next?", ["a", "b", "c", "d"], "A", video="v.mp4", image="i.png")
    text = processor.apply_chat_template(build_messages(sample), tokenize=False, add_generation_prompt=True)
    return hashlib.sha256(text.encode()).hexdigest()
