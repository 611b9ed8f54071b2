"""Flags from a script's `@dataclass Config`, and the one place where a user's mistake becomes a short message.

    if __name__ == "__main__":
        cli.run(main, Config, preset=preset)

- Every field is a flag of the same name: `--name value` or `--name=value`; a bool alone means true
  (`--resume`, `--resume true`, `--resume=false`); a list takes every value up to the next `--flag`.
  Only tokens starting with `--` are flags, so `-1e-5`, `-3` and `-inf` are values in any notation.
- Flags are never abbreviated; an unknown one is one line naming the closest real flags.
- `--help` prints every flag with the comment written beside its field in `Config` and its default,
  grouped by the Config's `# ---- group` lines (read from the source, so the help cannot drift from it).
- A preset (the tiny default) is chosen from what was parsed, never from the text of sys.argv: `preset`
  gets the flags the user gave, as a dict, and returns the Config whose values stand in for the
  defaults, or None. `--model=X` and `--model X` are the same to it.
- `run` turns a `UserError` (a bad flag, a missing file, a run that cannot resume; sbr.common) into
  `error: <message>` on stderr and exit status 2, with no traceback; every other exception is a bug
  and keeps its traceback.
"""
import dataclasses
import difflib
import inspect
import io
import json
import os
import re
import sys
import tokenize
import typing

from sbr.common import UserError


class UsageError(UserError):
    """A flag that is unknown, lacks its value or has a value of the wrong type."""


def _kinds(config_cls) -> dict:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _convert(name: str, kind, texts: list[str]):
    """The value of --name from its text(s), by the field's type."""
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return [_convert(name, item, [t]) for t in texts]
    args = [a for a in typing.get_args(kind) if a is not type(None)]    # `int | None` and friends
    if args and texts[0].lower() == "none":
        return None
    base = args[0] if args else kind
    text = texts[0]
    if base is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UsageError(f"--{name} {text}: expected true or false")
    try:
        return base(text)
    except ValueError:
        word = {int: "a whole number", float: "a number"}.get(base, base.__name__)
        raise UsageError(f"--{name} {text}: expected {word}") from None


def _closest(name: str, names: list[str]) -> list[str]:
    """Real flags a mistyped one may have meant: by initials (--lr: learning_rate), then by spelling."""
    initials = [n for n in names if "".join(w[0] for w in n.split("_")) == name]
    return (initials + [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in initials])[:3]


def given_flags(config_cls, argv: list[str]) -> dict:
    """{field: value} for each flag in argv (the last wins when one is repeated)."""
    kinds, out, i, name = _kinds(config_cls), {}, 0, None
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            where = f" after --{name}" if name else ""
            raise UsageError(f"unexpected value {token!r}{where}: flags are --name value")
        name, eq, inline = token[2:].partition("=")
        if name not in kinds:
            near = _closest(name, list(kinds))
            raise UsageError(f"unknown flag --{name}" + (f" (did you mean {' or '.join('--' + n for n in near)}?)"
                                                        if near else "") + "; --help lists them all")
        kind, i = kinds[name], i + 1
        values = ([inline] if inline else []) if eq else []
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
            if typing.get_origin(kind) is not list:
                break
        if not values and kind is bool and not eq:
            values = ["true"]
        if not values and typing.get_origin(kind) is not list:
            raise UsageError(f"--{name}: expected a value")
        out[name] = _convert(name, kind, values)
    return out


def parse(config_cls, argv: list[str] | None = None, *, preset=None):
    """The Config from argv: the given flags over the preset's values (when `preset(given)` returns one)
    or the class defaults. `--help` prints the help and exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]) or "--help" in argv:
        print(help_text(config_cls, preset))
        sys.exit(0)
    given = given_flags(config_cls, argv)
    base = (preset(given) if preset else None) or config_cls()
    return dataclasses.replace(base, **given)


# ---------------------------------------------------------------------------- --help from the source
def comments(config_cls) -> list[tuple[str, str, str]]:
    """(group, field, comment) for every field, in the order of the Config's source: a `# ---- name`
    line starts a group, a comment-only line under a field continues that field's comment, a field
    with no comment has "" (and still its group)."""
    source = inspect.getsource(config_cls)
    said = {tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(config_cls)}
    found, group, last = [], "", None
    for number, line in enumerate(source.splitlines(), 1):
        text = said.get(number, "")
        header = re.fullmatch(r"\s*#\s*-{3,}\s*(.*)", line)
        field = re.match(r"\s*(\w+)\s*:", line)
        if header:
            group, last = header.group(1), None
        elif field and field.group(1) in names:
            last = [group, field.group(1), text]
            found.append(last)
        elif last is not None and line.strip().startswith("#"):
            last[2] = (last[2] + " " + text).strip()
        else:
            last = None
    return [tuple(x) for x in found]


def _show(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "(none)"
    return '""' if value == "" else str(value)


def help_text(config_cls, preset=None) -> str:
    module = sys.modules[config_cls.__module__]
    doc = (module.__doc__ or "").strip()
    defaults = config_cls()
    tiny = preset({}) if preset else None
    said = {name: (group, text) for group, name, text in comments(config_cls)}
    lines = [doc, "", "flags (--name value or --name=value; a bool alone means true; the default in brackets):"]
    group = None
    for f in dataclasses.fields(config_cls):
        g, text = said.get(f.name, (group or "", ""))       # (every field is in `said`; a subclass's may not be)
        if g != group:
            group = g
            lines += ["", f"{g}:" if g else "flags:"]
        default = f"[{_show(getattr(defaults, f.name))}]"
        lines.append(f"  --{f.name:<26} {default:<14} {text}".rstrip())
    if tiny is not None:
        changed = [f"--{f.name} {_show(getattr(tiny, f.name))}" for f in dataclasses.fields(config_cls)
                   if getattr(tiny, f.name) != getattr(defaults, f.name)]
        when = (preset.__doc__ or "").strip().split(".")[0] or "A preset"
        lines += ["", f"{when}. Its values: " + ", ".join(changed)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the entry point
def run(main, config_cls, argv: list[str] | None = None, *, preset=None):
    """`main(parse(...))`, with a UserError printed as one short message (exit status 2, no traceback).
    Under torchrun with several ranks each rank's message starts with its rank."""
    try:
        return main(parse(config_cls, argv, preset=preset))
    except UserError as e:
        import torch.distributed as dist
        many = dist.is_initialized() and dist.get_world_size() > 1
        print(f"{f'rank {dist.get_rank()}: ' if many else ''}error: {message(e)}", file=sys.stderr, flush=True)
        if dist.is_initialized() and not many:
            dist.destroy_process_group()
        # With several ranks the others may be inside a collective: destroying the group would wait on them
        # (NCCL's abort can be collective), so this rank just exits and torchrun stops the rest.
        sys.exit(2)


def message(error: Exception) -> str:
    """A UserError's message; one raised in a DataLoader worker arrives rebuilt from the worker's whole
    traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its last line."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def save_config(cfg, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    os.replace(path + ".tmp", path)


def own_folder(tiny, given: dict):
    """The preset `tiny`, whose overwrite=True clears only its own out_dir: pointed at a folder the user
    named, it overwrites nothing unless the user gives --overwrite true too."""
    if "out_dir" in given and os.path.normpath(given["out_dir"]) != os.path.normpath(tiny.out_dir):
        return dataclasses.replace(tiny, overwrite=False)
    return tiny
