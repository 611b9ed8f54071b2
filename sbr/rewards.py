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


# GRPO-CARE's rewards as released (TencentARC/GRPO-CARE src/r1-v/src/open_r1/grpo.py), written anew
AUTHORS_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def accuracy_exact_reward(completion: str, answer: str) -> float:
    """GRPO-CARE's accuracy: the first tag's content, stripped, must be exactly the gold letter
    (`<answer>B. open drawer</answer>` and a lowercase b score 0; sbr's `accuracy` scores them 1)."""
    match = AUTHORS_ANSWER.search(completion)
    return 1.0 if match is not None and match.group(1).strip() == answer else 0.0


def format_full_reward(completion: str, answer: str) -> float:
    """GRPO-CARE's format: the whole completion is `<think>...</think>` then `<answer>...</answer>`
    (re.fullmatch; sbr's `format` asks it of the completion's start only)."""
    return 1.0 if FORMAT.fullmatch(completion.strip()) else 0.0


def authors_answer_mask(tokenizer, completion_ids, completion_mask):
    """GRPO-CARE's answer tokens as released (grpo_trainer_ref_ema.py, get_thinking_answer_masks): from
    the end, the last token containing "answer" whose window with its neighbours spells "<answer>";
    its answer is every token after it up to, not including, the third token before the completion's
    end (with `...</answer><|im_end|>` that is the tag's ">" and the content; the closing tag's first
    token is left out). (N, C) long; rows with no such token get none."""
    import torch
    mask = torch.zeros_like(completion_ids)
    for row, (ids, n) in enumerate(zip(completion_ids.tolist(), completion_mask.sum(1).tolist())):
        tokens = [t or "" for t in tokenizer.convert_ids_to_tokens(ids[:n])]     # an id past the vocabulary: None
        start = next((i for i in range(len(tokens) - 1, -1, -1) if "answer" in tokens[i]
                      and "<answer>" in "".join(tokens[max(i - 1, 0):i + 2])), None)
        if start is not None:
            mask[row, start + 1:max(start + 1, n - 3)] = 1
    return mask


THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def answer_token_mask(tokenizer, completion_ids, completion_mask):
    """(N, C) long mask of the completion tokens that spell the first <answer>...</answer>'s content
    (the span `extract_answer` reads), for GRPO-CARE's answer likelihood (sbr.grpo.answer_likelihood)."""
    return span_token_mask(tokenizer, completion_ids, completion_mask, ANSWER)


def span_token_mask(tokenizer, completion_ids, completion_mask, pattern: re.Pattern):
    """(N, C) long mask of the completion tokens that spell group 1 of `pattern`'s first match in the
    decoded completion (ANSWER: the answer's content; THINK: the reasoning's). A token counts when its
    characters overlap the span, so a token merging a tag's ">" with the content counts too; rows with no
    complete match get none. Token boundaries come from decoding prefixes (binary search: ~2 log2 C
    decodes a row)."""
    import torch
    mask = torch.zeros_like(completion_ids)
    for row, (ids, n) in enumerate(zip(completion_ids.tolist(), completion_mask.sum(1).tolist())):
        ids = ids[:n]
        match = pattern.search(tokenizer.decode(ids, skip_special_tokens=True))
        if match is None or match.start(1) == match.end(1):
            continue

        def first_token_ending_after(pos: int) -> int:      # smallest k with len(decode(ids[:k+1])) > pos
            lo, hi = 0, len(ids) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if len(tokenizer.decode(ids[:mid + 1], skip_special_tokens=True)) > pos:
                    hi = mid
                else:
                    lo = mid + 1
            return lo
        first, last = first_token_ending_after(match.start(1)), first_token_ending_after(match.end(1) - 1)
        mask[row, first:last + 1] = 1
    return mask


REWARDS = {"accuracy": accuracy_reward, "format": format_reward,
           "accuracy_exact": accuracy_exact_reward, "format_full": format_full_reward}
ACCURACY = ("accuracy", "accuracy_exact")      # the rewards that say a completion is right (GRPO-CARE's bonus reads one)


def register(name: str):
    """Decorator adding a reward to the registry, e.g. in a module or file passed to train_grpo.py as
    `--reward_module my_rewards` (or `--reward_module path/to/my_rewards.py`). A reward is
    `fn(completion, answer) -> float`, `answer` the gold letter; it may also take any of RECORD as
    keyword arguments (the question's record), or **record for all of them:

        @register("short_and_right")
        def short_and_right(completion, answer, *, options, level):
            return float(extract_answer(completion) == answer) - 0.001 * len(completion)
    """
    def add(fn):
        REWARDS[name] = fn
        return fn
    return add


def get_reward(name: str):
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name]


# What a reward may ask for by name, from the question's record (sbr.data.Sample).
RECORD = ("question", "options", "level", "domain", "video", "image", "sample_id")


def bind(fn):
    """`score(completion, sample) -> float` calling fn with (completion, sample.answer) and the RECORD
    keywords its signature names (all of them for **kwargs). A name it asks for that is not in RECORD
    is an error here, before any rollout."""
    import inspect
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        wanted = RECORD
    else:
        by_name = {p.name: p for p in params}
        named = [p.name for p in params[2:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = [n for n in named if n not in RECORD and by_name[n].default is inspect.Parameter.empty]
        if len(params) < 2 or unknown:
            raise TypeError(f"reward {fn.__name__}{inspect.signature(fn)}: expected fn(completion, answer, *, "
                            f"any of {', '.join(RECORD)})" + (f"; {', '.join(unknown)} is not one" if unknown else ""))
        wanted = [n for n in named if n in RECORD]

    def score(completion: str, sample) -> float:
        value = float(fn(completion, sample.answer, **{n: getattr(sample, n) for n in wanted}))
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"reward {fn.__name__} returned {value} for question {sample.sample_id!r}")
        return value
    return score


def load_module(spec: str):
    """Import `--reward_module`: a module name (importable from here) or a .py file's path."""
    import importlib
    import importlib.util
    import os
    import sys
    if spec.endswith(".py") or os.sep in spec:
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"--reward_module {spec}: no such file")
        name = "sbr_rewards_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(spec))[0])
        module_spec = importlib.util.spec_from_file_location(name, spec)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module                  # as an import does (dataclasses, pickle look it up there)
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name != spec.split(".")[0] and e.name != spec:
            raise                                   # the module itself imports something missing: its own bug
        raise FileNotFoundError(f"--reward_module {spec}: no module of that name importable from here (a file "
                                "path works too: --reward_module path/to/my_rewards.py)") from None
