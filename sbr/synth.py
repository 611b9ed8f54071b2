"""A synthetic egocentric-planning benchmark with SEED-Bench-R1's hierarchy, small enough for a CPU.

    python -m sbr.synth runs/repro/data [--train 1200] [--val 240]

Every procedure is "<verb> the <object>" for the four verbs of VERBS, in that order. A question names
the goal ("... in order to prepare the <object>?") and offers the four steps of that same procedure
in their order, so the text alone never tells the answer (0 to 3 steps are done, uniformly): it is the
step after the ones already done, and how many are done shows only in the pictures. Each finished step is a bright square in the top row of the
observation image, and the progress video shows them appearing one by one (no video when nothing is
done). The "environment" is the visual style: background colour and texture.
    L1  training objects, training styles              (in distribution)
    L2  training objects, unseen styles                (cross-environment)
    L3  unseen objects of four domains, unseen styles  (cross-environment and task)
The files follow SEED-Bench-R1's layout and fields exactly, so sbr reads them with the real loaders:
training_6k.jsonl (answer + negative_answers), training_with_cot_6k.jsonl (chat prompt + a short chain
of thought), validation_L{1,2,3}.jsonl (choice_a..d, golden_choice_idx; L3 with domain). A second SFT
file, warmup.jsonl, stands in for pre-training: its answers say truly how many steps the pictures show
done, then name a random next step and a random letter. It teaches the answer format and to report
what is seen, not which step comes next (the planning rule both SFT and GRPO must then learn).
"""
import json
import os
import random
import re
import sys

import numpy as np

VERBS = ["open", "wash", "fill", "close"]
TRAIN_OBJECTS = ["cup", "pot", "jar", "box", "bag", "pan", "tin", "lid"]
DOMAIN_OBJECTS = {"Daily life": ["bowl", "mug"], "Hobbies": ["kit", "case"],
                  "Recreation": ["tent", "cooler"], "Work": ["drawer", "crate"]}
TRAIN_STYLES = [(150, 60, 50), (60, 130, 60)]                 # reddish, greenish rooms
NEW_STYLES = [(50, 70, 160), (130, 110, 40)]                  # bluish, ochre rooms: never trained on
QUESTION = ("Considering the progress shown in the video and my current observation shown in the image, "
            "what action should I take next in order to prepare the {obj}?")
SIZE = 56                                                     # pixels; 4 x 4 patches of 14


# `vary_length`: training questions end with one of these (drawn uniformly), so training prompts vary in
# length by several tokens, as L3's do (five of its eight objects take a token more than every training
# object, and that token shows in the question and in all four options); without it, the small models
# trained on one prompt length fail on any other (SFT: 100% on L3's 2-token objects, 6.5% on 3-token ones)
FILLERS = ["", " here", " here now", " right here", " right here now", " here and now", " right here and now",
           " right here and now for me", " right here and now for me if you can", " right here and now for me if you can please"]


def steps(obj: str) -> list[str]:
    return [f"{verb} the {obj}" for verb in VERBS]


def question(obj: str, filler: str = "") -> str:
    return QUESTION.format(obj=obj)[:-1] + filler + "?"


def words(vary_length: bool = False) -> list[str]:
    """Every text the benchmark uses: the tokenizer is trained on these."""
    objs = TRAIN_OBJECTS + [o for os_ in DOMAIN_OBJECTS.values() for o in os_]
    fillers = FILLERS if vary_length else [""]
    return [question(o, f) for o in objs for f in fillers] + [s for o in objs for s in steps(o)] + \
        [f"<think>{k} steps done, next: {s}.</think><answer>{L}</answer>" for k in range(4) for s in VERBS for L in "ABCD"]


def picture(rng: np.random.Generator, style, done: int) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: a textured background in the style's colour, `done` white squares on top."""
    base = np.array(style, dtype=np.float32)
    img = base + rng.normal(0, 18, (SIZE, SIZE, 3))
    stripes = (np.arange(SIZE) // 7 % 2)[None, :, None] * 25        # a texture that is part of the style
    img = img + stripes * (1 if style[0] > style[2] else -1)
    for k in range(done):
        img[2:12, 2 + 13 * k:12 + 13 * k] = 245
    return np.clip(img, 0, 255).astype(np.uint8)


def clip(rng, style, done: int) -> np.ndarray:
    """The progress so far: two frames per finished step, the squares appearing one by one."""
    return np.stack([picture(rng, style, 1 + t // 2) for t in range(2 * done)])


TEMPLATED = ("Let me look at the video and the current image, then choose the next action for the goal.",
             "The goal needs several steps; judging from the progress so far, one option fits best.",
             "I compare the options with what the video shows and pick the most reasonable next step.")


def build(root: str, *, train: int = 1200, val: int = 240, seed: int = 0, cot_noise: float = 0.0,
          vary_length: bool = False) -> str:
    """`cot_noise`: the fraction of SFT chains of thought whose reasoning is a templated sentence that
    says nothing of the count (the answer stays right), as in the paper's SFT data, distilled from
    stronger models by rejection sampling: right answers, often templated reasoning. 0 keeps every
    chain exact (`k steps done, next: <verb>`), which teaches SFT the rule itself. Its draws use their
    own generator, so the data are otherwise the same for a seed."""
    from sbr.data import Sample
    from sbr.prompt import build_question
    from sbr.tiny import write_video
    from PIL import Image
    rng, nrng, noise = random.Random(seed), np.random.default_rng(seed), random.Random(f"cot-{seed}")
    lengths = random.Random(f"length-{seed}")              # its own draws: the data are otherwise the same
    for d in ("annotations", "videos/Synth", "images/Synth"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    splits = {"training_6k": (train, TRAIN_OBJECTS, TRAIN_STYLES), "validation_L1": (val, TRAIN_OBJECTS, TRAIN_STYLES),
              "validation_L2": (val, TRAIN_OBJECTS, NEW_STYLES),
              "validation_L3": (val, [(d, o) for d, os_ in DOMAIN_OBJECTS.items() for o in os_], NEW_STYLES)}
    cot, warmup = [], []
    for split, (count, objects, styles) in splits.items():
        records = []
        for i in range(count):
            obj = objects[i % len(objects)]
            domain, obj = obj if isinstance(obj, tuple) else (None, obj)
            done = rng.randrange(4)
            style = styles[rng.randrange(len(styles))]
            name = f"{split}_{i:05d}"
            if done:
                write_video(os.path.join(root, "videos", "Synth", f"{name}.mp4"), clip(nrng, style, done), 2)
            Image.fromarray(picture(nrng, style, done)).save(os.path.join(root, "images", "Synth", f"{name}.png"))
            answer, options = steps(obj)[done], steps(obj)
            filler = lengths.choice(FILLERS) if vary_length and split == "training_6k" else ""
            record = {"sample_id": i if split != "validation_L3" else f"L3-{i}", "question": question(obj, filler),
                      "video_source": "Synth", "video_basename": f"{name}.mp4",
                      "current_observation_basename": f"{name}.png",
                      "task_progress_metadata": [{"narration_text": s} for s in options[:done]]}
            if split == "training_6k":
                shuffled = options                                # in the procedure's order (see above)
                letter = "ABCD"[shuffled.index(answer)]
                record.update({f"choice_{c}": o for c, o in zip("abcd", shuffled)}, golden_choice_idx=letter,
                              answer=answer, negative_answers=[o for o in options if o != answer])
                content = ([{"type": "video", "video": f"videos/Synth/{name}.mp4"}] if done else []) + [
                    {"type": "image", "image": f"images/Synth/{name}.png"},
                    {"type": "text", "text": build_question(Sample(i, record["question"], shuffled, letter))}]
                prompt = [{"role": "user", "content": content}]
                reasoning = f"{done} steps done, next: {VERBS[done]}."
                if cot_noise and noise.random() < cot_noise:
                    reasoning = noise.choice(TEMPLATED)
                cot.append({"sample_id": i, "prompt": prompt, "response": f"<think>{reasoning}</think><answer>{letter}</answer>"})
                warmup.append({"sample_id": i, "prompt": prompt,
                               "response": f"<think>{done} steps done, next: {rng.choice(VERBS)}.</think>"
                                           f"<answer>{rng.choice('ABCD')}</answer>"})
            else:
                shuffled = options
                record.update({f"choice_{c}": o for c, o in zip("abcd", shuffled)},
                              golden_choice_idx="ABCD"[shuffled.index(answer)], answer=answer)
                if domain:
                    record["domain"] = domain
            records.append(record)
        _write(os.path.join(root, "annotations", f"{split}.jsonl"), records)
    _write(os.path.join(root, "annotations", "training_with_cot_6k.jsonl"), cot)
    _write(os.path.join(root, "annotations", "warmup.jsonl"), warmup)
    return root


def _write(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------------------- reasoning vs answer
# GRPO-CARE's claim is that RL's reasoning drifts from its answers and that its bonus mends this; the
# paper measures consistency with an LLM judge. Here it is exact: options are always the procedure's
# steps in VERBS order, so a chain of thought that names the next step ("next: fill") implies one letter.
NEXT_STEP = re.compile(r"next:\s*(\w+)")


def consistent(response: str, extracted: str | None) -> bool:
    """Whether the answer letter is the one the reasoning's stated next step implies (False when there
    is no answer, no closed <think>, or the reasoning names no step)."""
    think = re.search(r"<think>(.*?)</think>", response, re.DOTALL)
    said = NEXT_STEP.search(think.group(1)) if think else None
    return bool(extracted and said and said.group(1) in VERBS and "ABCD"[VERBS.index(said.group(1))] == extracted)


def consistency(rows: list[dict]) -> dict:
    """Prediction rows (evaluate.py's predictions_<level>.jsonl) -> counts of questions, answered (a
    parsable letter) and consistent (answered with the letter the reasoning implies)."""
    answered = [r for r in rows if r["extracted"]]
    return {"questions": len(rows), "answered": len(answered),
            "consistent": sum(consistent(r["response"], r["extracted"]) for r in answered)}


def consistency_table(runs: dict[str, list[str]], levels=(("L1-L3", ("L1", "L2", "L3")), ("L3", ("L3",)))) -> str:
    """{method: its evaluation folders, one a seed} -> mean ± std over seeds of the answered rate and
    the consistency rate (consistent / answered), % , for each group of levels."""
    from sbr.results import markdown_table, mean_std, seeds_label
    cols = [f"{name} {what}" for name, _ in levels for what in ("answered", "consistent of answered")]
    rows = []
    for method, dirs in runs.items():
        rates = {c: [] for c in cols}
        for d in dirs:
            by_level = {lv: [json.loads(line) for line in open(os.path.join(d, f"predictions_{lv}.jsonl"))]
                        for lv in {lv for _, group in levels for lv in group}}
            for name, group in levels:
                n = consistency([row for lv in group for row in by_level[lv]])
                rates[f"{name} answered"].append(100 * n["answered"] / n["questions"])
                if n["answered"]:
                    rates[f"{name} consistent of answered"].append(100 * n["consistent"] / n["answered"])
        rows.append([seeds_label(method, len(dirs)), *(mean_std(rates[c]) for c in cols)])
    return markdown_table(cols, rows)


def l3_by_length(runs: dict[str, list[str]]) -> str:
    """{method: its evaluation folders, one a seed} -> L3 accuracy %, mean ± std over seeds, split by how
    many tokens the goal's object takes in the model's tokenizer (" <object>"). A confound of this
    benchmark: every training object takes the same number, so an L3 question whose object takes more
    is also a longer prompt than any seen in training."""
    from transformers import AutoTokenizer
    from sbr.results import markdown_table, mean_std, read_results, seeds_label
    acc, trained = {m: {} for m in runs}, set()                 # acc[method][tokens]: one accuracy a seed
    for method, dirs in runs.items():
        for d in dirs:
            cfg = read_results(d)["config"]
            tok = AutoTokenizer.from_pretrained(cfg["model"])

            def n_tokens(word: str) -> int:
                return len(tok.tokenize(" " + word))
            trained |= {n_tokens(o) for o in TRAIN_OBJECTS}
            with open(os.path.join(cfg["data_root"], "annotations", "validation_L3.jsonl")) as f:
                goal = {str(r["sample_id"]): r["question"].rsplit(" ", 1)[1].rstrip("?") for r in map(json.loads, f)}
            right = {}                                          # tokens -> correct or not, one a question
            for row in map(json.loads, open(os.path.join(d, "predictions_L3.jsonl"))):
                right.setdefault(n_tokens(goal[str(row["sample_id"])]), []).append(bool(row["correct"]))
            for k, xs in right.items():
                acc[method].setdefault(k, []).append(100 * sum(xs) / len(xs))
    counts = sorted({k for by_tokens in acc.values() for k in by_tokens})
    cols = [f"L3, objects of {k} tokens" + (" (as every training object)" if trained == {k} else
                                            " (as some training objects)" if k in trained else "") for k in counts]
    return markdown_table(cols, [[seeds_label(m, len(runs[m])), *(mean_std(acc[m].get(k, [])) for k in counts)]
                                 for m in runs])


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--val", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cot_noise", type=float, default=0.0, help="fraction of SFT chains with templated reasoning")
    p.add_argument("--vary_length", action="store_true", help="training questions of several lengths (FILLERS)")
    p.add_argument("--model", default="", help="also build a small random Qwen2-VL here")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    build(args.root, train=args.train, val=args.val, seed=args.seed, cot_noise=args.cot_noise, vary_length=args.vary_length)
    if args.model:
        from sbr.tiny import build_model_dir
        build_model_dir(args.model, seed=args.seed, words=words(args.vary_length), hidden=args.hidden, layers=args.layers,
                        vision_width=64, vision_depth=2)
    print(args.root, file=sys.stderr)
