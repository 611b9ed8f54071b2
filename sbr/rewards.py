"""Answer extraction and rewards, registered by name so training can pick them (`--reward_funcs`).

Scoring follows the authors' `accuracy_reward`: the first `<answer>...</answer>` in the completion,
stripped, and its first character compared with the gold letter (so `<answer> B. open drawer</answer>`
is B). We also accept a lowercase letter, which the authors' exact comparison would score 0.
"""
import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def extract_answer(text: str, letters: str = "ABCD") -> str | None:
    """The letter inside the first <answer> tag, or None when there is no tag, it is empty, or its
    first character is not one of `letters` (LongVideoBench passes "ABCDE")."""
    match = ANSWER.search(text)
    if match is None:
        return None
    inner = match.group(1).strip()
    letter = inner[:1].upper()
    return letter if letter and letter in letters else None


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 when the extracted letter is the gold letter, else 0.0 (no tag or an empty tag: 0)."""
    return 1.0 if extract_answer(completion, "ABCDE") == answer else 0.0


def format_reward(completion: str, answer: str) -> float:
    """1.0 when the completion starts `<think>...</think>` followed by `<answer>...</answer>`."""
    return 1.0 if FORMAT.match(completion) else 0.0


REWARDS = {"accuracy": accuracy_reward, "format": format_reward}


def register(name: str):
    """Decorator adding `fn(completion, answer) -> float` to the registry, e.g. in a module passed to
    train_grpo.py as `--reward_module my_rewards`."""
    def add(fn):
        REWARDS[name] = fn
        return fn
    return add


def get_reward(name: str):
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name]
