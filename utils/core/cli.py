"""The command line of every script: `fire.Fire` over one dataclass of flags, strict before any work starts.

A script declares its flags once, as a dataclass whose fields carry a help string and, where it matters, a range
(as litgpt and LLaMA-Factory declare theirs), and ends with `run_cli(main)`; `main` takes that dataclass:

    @dataclass
    class Args:
        base_model: str = flag("", "local folder or hub id of the base model (required)")
        lora_r: int = flag(8, "LoRA rank", low=1)

    def main(args: Args) -> None: ...

Fire reads the command line (`--name value`, `--name=value`, `--name` for True, `--noname` for False) and hands over
every value as typed; here each one becomes its field's type, unknown flags get a "did you mean", the ranges are
checked, and every problem goes into one `error:` line with exit code 2 before `main` runs. `--help` is fire's own
help page, written from the help strings. Library errors that mean a full or broken disk become one line here too;
`--debug` (or LOGLEVEL=DEBUG) shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import operator
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from utils.core.errors import EXIT_USER_ERROR, UserError, did_you_mean, raise_problems, redact, storage_failure


def flag(default: Any, help: str, *, low: float | None = None, high: float | None = None,
         above: float | None = None, below: float | None = None, choices: tuple[Any, ...] = (),
         positional: bool = False) -> Any:
    """One flag: its default, the help `--help` shows, and its range: `low`/`high` inclusive, `above`/`below`
    exclusive, or `choices`. `positional`: this field takes the words given without a flag (a tuple of them)."""
    bounds = {"low": low, "high": high, "above": above, "below": below, "choices": tuple(choices)}
    return dataclasses.field(default=default, metadata={"help": help, "positional": positional, **bounds})


def range_problems(args: Any) -> list[str]:
    """Every field of the dataclass `args` outside the range its `flag` declares."""
    problems = []
    for field in dataclasses.fields(args):
        value, meta = getattr(args, field.name), field.metadata
        if value is None or isinstance(value, bool) or "help" not in meta:
            continue
        if meta["choices"] and value not in meta["choices"]:
            problems.append(f"--{field.name} must be one of {_choices(meta)}, got {value!r}")
        elif isinstance(value, (int, float)) and not _in_range(value, meta):
            problems.append(f"--{field.name} must be {_describe(meta)}, got {value!r}")
    return problems


def _choices(meta: Mapping[str, Any]) -> str:
    return ", ".join(str(choice) if choice != "" else "'' (empty)" for choice in meta["choices"])


def _bounds(meta: Mapping[str, Any]) -> str:  # `; >= 1`, `; one of a, b` or `` for the help page
    described = f"one of {_choices(meta)}" if meta.get("choices") else _describe(meta) if "help" in meta else ""
    return f"; {described}" if described else ""


_BOUNDS = {"low": (">=", operator.ge), "above": (">", operator.gt), "high": ("<=", operator.le),
           "below": ("<", operator.lt)}


def _in_range(value: float, meta: Mapping[str, Any]) -> bool:
    return not math.isnan(value) and all(meta[key] is None or holds(value, meta[key])
                                         for key, (_, holds) in _BOUNDS.items())


def _describe(meta: Mapping[str, Any]) -> str:
    return " and ".join(f"{sign} {meta[key]}" for key, (sign, _) in _BOUNDS.items() if meta.get(key) is not None)


# --- values as typed -> field types ------------------------------------------------------------------------------

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
_KIND_NAMES = {bool: "True or False", int: "an integer", float: "a number"}


def convert(raw: str, hint: Any) -> Any:
    """The command-line text `raw` as a value of `hint` (str, int, float, bool, a tuple of str, or a union of them
    with None), `~` expanded; a `ValueError` that says what is wrong after the flag's name."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if typing.get_origin(hint) is tuple:
        return tuple(part for part in raw.split(",") if part)
    if type(None) in allowed and raw in ("None", "none"):
        return None
    if bool in allowed and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE
    if raw in ("True", "False"):  # fire's value for `--flag` and `--noflag` given without a value
        raise ValueError("needs a value")
    for kind in (int, float):
        if kind in allowed:
            try:
                value = kind(raw)
            except ValueError:
                continue
            if math.isinf(value):  # `1e400`: no flag means anything by it
                raise ValueError(f"must be a finite number, got {raw!r}")
            return value
    if str in allowed:  # exactly as typed (fire alone would turn `--wandb_run_name 1e-3` into 0.001)
        return os.path.expanduser(raw) if raw.startswith("~") else raw  # `--output_dir=~/x`: no shell expands it
    kinds = " or ".join(_KIND_NAMES[kind] for kind in allowed if kind in _KIND_NAMES)
    raise ValueError(f"must be {kinds}, got {raw!r}")


def args_class(main: Callable[..., Any]) -> type:
    """The dataclass of flags that `main` takes as its one parameter."""
    parameter = next(iter(inspect.signature(main).parameters))
    return typing.get_type_hints(main)[parameter]


def parse_args(cls: type, given: Mapping[str, Any], positional: tuple[Any, ...] = ()) -> Any:
    """An instance of `cls` from fire's flags `given` (values as typed), or one `UserError` naming every unknown
    flag, stray word, wrong type and value out of range."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    problems, values = [], {}
    for name, raw in given.items():
        short = [field for field in fields if field.startswith(name)] if len(name) == 1 else []
        name = short[0] if len(short) == 1 else name  # `-n 3`: fire's help shows a letter that names one flag
        if name not in fields:
            problems.append(f"unknown flag --{name}{did_you_mean(name, list(fields))}")
            continue
        try:
            values[name] = convert(raw, hints[name])
        except ValueError as error:
            problems.append(f"--{name} {error}")
    extra = next((f for f in fields.values() if f.metadata.get("positional")), None)
    if positional and extra is None:
        problems.append(f"unexpected argument {str(positional[0])!r}: flags are written --name value")
    elif positional:
        values[extra.name] = tuple(map(str, positional))
    args = cls(**values)
    problems += range_problems(args)
    if any(problem.startswith("unknown flag") for problem in problems):
        problems[-1] += " (--help lists the flags)"
    raise_problems(problems)
    return args


# --- running a script --------------------------------------------------------------------------------------------


def _command(main: Callable[..., Any], name: str) -> Callable[..., Any]:
    """What fire calls: every flag arrives as typed (`**given`), is parsed into `main`'s dataclass, then `main` runs.
    `--help` is fire's own help page, for a stand-in whose signature and docstring are the flags and their help."""
    import fire.helptext
    import fire.trace
    from fire.decorators import SetParseFn

    cls, hints = args_class(main), typing.get_type_hints(args_class(main))
    fields = dataclasses.fields(cls)

    def page(**flags: Any) -> None: ...

    page.__doc__ = "\n".join([(inspect.getdoc(main) or "").split("\n\n")[0], "", "Args:", *(
        f"  {field.name}: {field.metadata.get('help', '')}{_bounds(field.metadata)}" for field in fields)])
    page.__signature__ = inspect.Signature([inspect.Parameter(  # type: ignore[attr-defined]
        field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=hints[field.name])
        for field in fields])

    def call(*positional: Any, **given: Any) -> Any:
        if given.keys() & {"help", "h"}:
            return print(fire.helptext.HelpText(page, trace=fire.trace.FireTrace(page, name=name)))
        return main(parse_args(cls, given, positional))

    return SetParseFn(str)(call)  # fire hands every value over as the text typed


def run_cli(component: Callable[..., Any] | Mapping[str, Callable[..., Any]], argv: list[str] | None = None) -> None:
    """`python script.py argv...`: fire calls `component` (a `main`, or {command: main}); a `UserError`, and a
    library error that has a plain cause, becomes `error: ...` and exit code 2."""
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LOGLEVEL", "").upper() == "DEBUG"
    argv = [word for word in argv if word != "--debug"]
    program = os.path.basename(sys.argv[0]) or "script.py"
    if not sys.stderr.isatty():
        quiet_progress_bars()
    try:
        main, argv, name = _select(component, argv, program)
        if "--" in argv:  # fire would take what follows as its own flags (--interactive opens a console)
            raise UserError(f"unexpected {' '.join(argv[argv.index('--'):])!r}: these scripts take no fire flags")
        fire.Fire(_command(main, name), command=argv, name=name, serialize=lambda result: None)
    except UserError as error:
        if debug:
            raise
        fail(str(error))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except BrokenPipeError:  # `python infer.py ... | head`: the reader left; not an error of this program
        silence_stdout()
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a program that died of SIGPIPE
    except Exception as error:
        reason = storage_failure(error)
        if reason is None or debug:
            raise
        where = getattr(error, "filename", None)
        fail(f"cannot write{f' {where}' if where else ''}: {reason}; free space (or fix the file system) and run again")


def quiet_progress_bars() -> None:
    """No progress bars from the libraries (hub downloads, "Loading weights", datasets' map, transformers' GGUF
    conversion): in a log file (nohup, sbatch, `| tee`) every redraw is a `\r`-joined chunk of junk. The scripts' own
    progress lines stay."""
    import tqdm.std
    from huggingface_hub.utils import disable_progress_bars

    init = tqdm.std.tqdm.__dict__["__init__"]  # tqdm reads TQDM_DISABLE=1 only on import, and torch imported it first
    if not getattr(init, "keywords", {}).get("disable"):  # so set its default the way tqdm's environment does
        tqdm.std.tqdm.__init__ = functools.partialmethod(init, disable=True)
    disable_progress_bars()  # transformers and datasets copy this setting when they are imported
    for module, disable in (("transformers.utils.logging", "disable_progress_bar"),
                            ("datasets", "disable_progress_bars")):
        if module in sys.modules:
            getattr(sys.modules[module], disable)()


def _select(component: Callable[..., Any] | Mapping[str, Callable[..., Any]], argv: list[str], program: str,
            ) -> tuple[Callable[..., Any], list[str], str]:
    """(the `main` to call, its argv, its name) for a `main` or a {command: main} mapping."""
    if not isinstance(component, Mapping):
        return component, argv, program
    commands = ", ".join(component)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python {program} COMMAND --FLAG VALUE ...\n\ncommands: {commands}\n"
              f"`python {program} COMMAND --help` lists a command's flags.")
        raise SystemExit(0)
    if argv[0] not in component:
        raise UserError(f"unknown command {argv[0]!r}{did_you_mean(argv[0], list(component), prefix='')}; "
                        f"commands: {commands}")
    return component[argv[0]], argv[1:], f"{program} {argv[0]}"


def fail(message: str) -> None:
    """Print `error: message` (secrets hidden) and exit with the user-error code."""
    print(f"error: {redact(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not complain about the closed pipe."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
