"""A reward a random tiny model earns about half the time, so GRPO tests see non-zero advantages.
Registered through train_grpo.py's --reward_module, the way a researcher adds their own."""
from sbr.rewards import register


@register("toy_even_length")
def toy_even_length(completion: str, answer: str) -> float:
    return float(len(completion) % 2 == 0)


@register("toy_one_in_five")
def toy_one_in_five(completion: str, answer: str) -> float:
    """Earned about one time in five: a group of 4 gets the same reward on every completion ~40% of the time."""
    return float(len(completion) % 5 == 0)
