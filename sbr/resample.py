"""DAPO's dynamic sampling: a step trains only groups whose G rewards differ.

A group whose G rewards are all equal gets Â = 0 on every completion: no policy gradient, only its
share of the normaliser and the KL term. With `--dynamic_sampling true` (DAPO, Yu et al. 2025, §3.2)
every rank rolls out Q more questions a round while any rank holds fewer than Q informative groups, up
to `max_rounds` extra rounds; all ranks roll out in every round, since FSDP2's all-gathers are
collective. Each rank then trains its first Q informative groups in the order drawn, filled up with
uninformative ones (in that order) if the rounds ran out, so a step's shapes and normalisers stay Q x G.

Round k's questions on rank r at step s are the slots ((k - 1) W + r) Q.. of a permutation of the
training file seeded by (seed, s), the step's own questions left out: no question is drawn twice in a
step, on any rank. Each is sampled from its own generator (sbr.training.question_seed) salted by the
step and round, so it does not replay the stream its own scheduled rollout uses. The step's data is a
function of the seed and the step: a resumed run draws the same. (A question drawn as an extra may still
come again later in the epoch, as DAPO's, which takes its extras from the data stream, would not.)
Informative is judged on the reward of --reward_funcs (before GRPO-CARE's bonus, which needs π_ref).
"""
import random

import torch
import torch.distributed as dist

from sbr.rollout import Rollout


def informative(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (Q*G,) -> (Q,) bool: the group's rewards are not all equal."""
    r = rewards.view(-1, group_size)
    return (r != r[:, :1]).any(1)


def extra_questions(n: int, count: int, *, seed: int, step: int, round: int, rank: int, world: int,
                    taken: set[int]) -> list[int]:
    """Round `round`'s `count` questions for `rank`: consecutive slots of one permutation of the training
    file seeded by (seed, step), the step's own questions on every rank (`taken`) left out, so no
    question is drawn twice in a step, on any rank or round."""
    order = list(range(n))
    random.Random(f"resample:{seed}:{step}").shuffle(order)
    order = [i for i in order if i not in taken]
    first = ((round - 1) * world + rank) * count
    return [order[(first + j) % len(order)] for j in range(count)]


def take(rollouts: list[Rollout], groups: list[int], group_size: int, pad_token_id: int) -> Rollout:
    """The completions of `groups` (numbered over the rollouts in order) as one Rollout, right-padded to
    the longest completion."""
    C = max(r.completion_ids.shape[1] for r in rollouts)

    def cat(name, pad):
        parts = [getattr(r, name) for r in rollouts]
        if parts[0] is None:
            return None
        if parts[0].dim() == 2:
            parts = [torch.nn.functional.pad(p, (0, C - p.shape[1]), value=pad) for p in parts]
        rows = torch.cat(parts)                                              # (all groups x G, ...)
        index = torch.tensor([g * group_size + i for g in groups for i in range(group_size)], device=rows.device)
        return rows[index]
    return Rollout(cat("completion_ids", pad_token_id), cat("completion_mask", 0), cat("logp", 0.0),
                   cat("truncated", False), cat("lengths", 0), cat("entropy", 0.0))


def dynamic_sampling(roll, first, *, load, n: int, Q: int, G: int, weights: torch.Tensor, max_rounds: int,
                     seed: int, step: int, rank: int, world: int, taken: set[int], device, pad_token_id: int):
    """first = (items, rollout, texts, scores) of the step's own questions; roll(items, salt=...) rolls out
    and scores more (the same tuple but items), each question from its own sampling stream salted by the
    round (never the stream its scheduled rollout uses); load(i) reads training question i; taken: the
    step's questions on every rank. Returns the chosen (items, rollout, texts, scores), every extra item
    drawn, and the step's figures."""
    rounds = [first]
    flags = [informative((first[3] * weights).sum(1), G)]      # (Q,) a round: its groups' rewards differ
    while len(rounds) <= max_rounds:
        fewest = torch.tensor(min(int(sum(f.sum() for f in flags)), Q), device=device)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
        if fewest.item() >= Q:                       # every rank has its Q: no rank rolls out again
            break
        k = len(rounds)
        extra = [load(i) for i in extra_questions(n, Q, seed=seed, step=step, round=k, rank=rank, world=world,
                                                  taken=taken)]
        rounds.append((extra, *roll(extra, salt=f"resample:{step}:{k}")))
        flags.append(informative((rounds[-1][3] * weights).sum(1), G))
    items = [it for r in rounds for it in r[0]]
    good = torch.cat(flags).tolist()
    chosen = ([g for g, ok in enumerate(good) if ok] + [g for g, ok in enumerate(good) if not ok])[:Q]
    texts = [t for r in rounds for t in r[2]]
    scores = torch.cat([r[3] for r in rounds])
    rows = [g * G + i for g in chosen for i in range(G)]
    figures = {"dynamic/rounds": len(rounds) - 1, "dynamic/extra_rollouts": (len(rounds) - 1) * Q,
               "dynamic/dropped": len(good) - Q, "dynamic/informative": sum(good[g] for g in chosen) / Q}
    return ([items[g] for g in chosen], take([r[1] for r in rounds], chosen, G, pad_token_id),
            [texts[i] for i in rows], scores[rows], [it for r in rounds[1:] for it in r[0]], figures)
