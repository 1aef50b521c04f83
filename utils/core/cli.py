"""The command line of every script: `fire.Fire(main)`, made strict before any work starts.

`run_cli(main)` reads the flags first, against `main`'s signature:

- an unknown flag (`--num_epoch`) or a stray positional argument is refused with "did you mean --num_epochs?";
- every value is checked against the parameter's type hint (`int`, `float`, `bool`, `str`, optional ones) and
  the ranges a script declares with `@option_checks(...)`; `str` flags keep the text exactly as typed (fire would
  turn `--wandb_run_name 1e-3` into 0.001);
- `--help` lists every flag with its type, default and the comment written beside it in the signature;
- all problems together are one `error: ...` line, exit code 2, before fire calls `main`.

Then fire calls `main` as usual. A `UserError` raised inside is printed the same way; `--debug` (or
`LOGLEVEL=DEBUG`) re-raises it with the traceback, for developers.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from utils.core.errors import EXIT_USER_ERROR, UserError, redact
from utils.core.io import write_failure

_FLAG = re.compile(r"^--[A-Za-z_][\w-]*(=.*)?$")
_VALUE_LIKE_FLAG = re.compile(r"^-[a-zA-Z]")  # fire takes `-x...` as a flag, `-1` as a value


# --- ranges a script declares -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A numeric range (`low`/`high`, each inclusive unless `*_open`) or a set of `choices`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()

    def problem(self, flag: str, value: Any) -> str | None:
        if value is None or isinstance(value, bool):
            return None
        if self.choices:
            return None if value in self.choices else (
                f"{flag} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and math.isnan(value):
            return f"{flag} must be a number, got nan"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            return f"{flag} must be {self.describe()}, got {value!r}"
        return None

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


POSITIVE = Check(low=0, low_open=True)  # > 0
AT_LEAST_ONE = Check(low=1)
NON_NEGATIVE = Check(low=0)
FRACTION = Check(low=0, high=1)  # [0, 1]
DROPOUT = Check(low=0, high=1, high_open=True)  # [0, 1)
PROBABILITY = Check(low=0, high=1, low_open=True)  # (0, 1]
PORT = Check(low=1, high=65535)
SEED = Check(low=0, high=2**32 - 1)


def choices(*values: Any) -> Check:
    return Check(choices=tuple(values))


def option_checks(**checks: Check) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the ranges of a script's flags: `@option_checks(lora_r=AT_LEAST_ONE, lora_dropout=DROPOUT)`."""

    def attach(function: Callable[..., Any]) -> Callable[..., Any]:
        function.__option_checks__ = {**getattr(function, "__option_checks__", {}), **checks}  # type: ignore[attr-defined]
        return function

    return attach


# --- reading argv ---------------------------------------------------------------------------------------------------


def scan_flags(argv: list[str]) -> tuple[dict[str, str | bool], list[str], list[str]]:
    """(flags as typed, positional arguments, bare `--noNAME` flags) with fire's grammar: `--name value`,
    `--name=value`, `--name` alone (True); words after a `--` separator are fire's own flags and are left alone."""
    flags: dict[str, str | bool] = {}
    positional: list[str] = []
    negated: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            break
        if _FLAG.match(token):
            body = token[2:]
            if "=" in body:
                name, value = body.split("=", 1)
                flags[name.replace("-", "_")] = value
            else:
                name = body.replace("-", "_")
                following = argv[index + 1] if index + 1 < len(argv) else None
                if following is None or following.startswith("--") or _VALUE_LIKE_FLAG.match(following):
                    flags[name] = True
                    negated.append(name)
                else:
                    flags[name] = following
                    index += 1
        elif _VALUE_LIKE_FLAG.match(token):
            flags[token.lstrip("-").replace("-", "_")] = True  # a one-letter flag: reported as unknown below
        else:
            positional.append(token)
        index += 1
    return flags, positional, negated


# --- types -----------------------------------------------------------------------------------------------------------


def _hint_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types a hint allows (`float | None` -> (float, NoneType)); None when it is anything richer."""
    if hint in (int, float, bool, str):
        return (hint,)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if all(member in (int, float, bool, str, type(None)) for member in members):
            return tuple(members)
    return None


_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def coerce(flag: str, value: Any, raw: str | bool | None, hint: Any) -> tuple[Any, str | None]:
    """(the value for `main`, or a problem): `value` is what fire parsed, `raw` the text typed on the command line."""
    allowed = _hint_types(hint)
    if allowed is None:
        return value, None
    if value is None and type(None) in allowed:
        return None, None
    if bool in allowed and str in allowed and isinstance(raw, str) and raw.lower() in ("true", "false"):
        return raw.lower() == "true", None  # a flag that takes a path or True/False
    if str in allowed and isinstance(raw, str) and not (type(None) in allowed and raw in ("None", "none")):
        return raw, None  # exactly as typed
    if raw is True and bool not in allowed:
        return value, f"{flag} needs a value"
    if bool in allowed:
        if isinstance(value, bool):
            return value, None
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE, None
        if len(allowed) == 1 or (len(allowed) == 2 and type(None) in allowed):
            return value, f"{flag} must be True or False, got {raw if isinstance(raw, str) else value!r}"
    if int in allowed and not isinstance(value, bool):
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer() and float not in allowed:
            return int(value), None
    if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # `1e400` parses as inf: no flag means anything by it
            return value, f"{flag} must be a finite number, got {raw if isinstance(raw, str) else value!r}"
        return float(value), None
    if str in allowed and isinstance(value, (str, int, float, bool)):
        return str(value), None
    names = " or ".join("an integer" if t is int else "a number" if t is float else t.__name__
                        for t in allowed if t is not type(None))
    shown = raw if isinstance(raw, str) else value
    return value, f"{flag} must be {names}, got {shown!r}"


# --- help -------------------------------------------------------------------------------------------------------------

_PARAMETER = re.compile(r"^\s*\**(\w+)\s*(?::\s*([^=#]+?))?\s*(?:=\s*(.+?))?\s*,?\s*(?:#\s*(.*))?$")
_SECTION = re.compile(r"^\s*#\s*(.+?)\s*$")


def flag_comments(function: Callable[..., Any]) -> tuple[dict[str, str], dict[str, str]]:
    """({parameter: the comment written beside it}, {parameter: the section comment above it}) from the source."""
    comments: dict[str, str] = {}
    sections: dict[str, str] = {}
    sources = [inspect.unwrap(function), *getattr(function, "__flag_sources__", ())]
    for source in sources:
        try:
            lines = inspect.getsource(source).splitlines()
        except (OSError, TypeError):
            continue
        section = ""
        for line in lines:
            section_match = _SECTION.match(line)
            if section_match:
                section = section_match.group(1)
                continue
            match = _PARAMETER.match(line)
            if match and match.group(4) and match.group(1) not in comments:
                comments[match.group(1)] = match.group(4).strip()
                if section:
                    sections[match.group(1)] = section
    return comments, sections


def render_help(name: str, function: Callable[..., Any]) -> str:
    signature = inspect.signature(function)
    comments, sections = flag_comments(function)
    doc = (inspect.getdoc(function) or "").split("\n\n")[0]
    lines = [f"usage: python {name} --FLAG VALUE ...", ""] + ([doc, ""] if doc else [])
    current = None
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            lines.append(f"  {parameter.name} ...  {comments.get(parameter.name, 'positional arguments')}")
            continue
        if parameter.kind is parameter.VAR_KEYWORD:
            continue
        section = sections.get(parameter.name)
        if section and section != current:
            lines += ["", f"{section}:"]
            current = section
        hint = parameter.annotation
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        default = "" if parameter.default is parameter.empty else f" [{parameter.default!r}]"
        lines.append(f"  --{parameter.name} ({kind}){default}")
        if comments.get(parameter.name):
            lines.append(f"      {comments[parameter.name]}")
    lines += ["", "Booleans take True/False; --debug shows a traceback with any error."]
    return "\n".join(lines)


# --- checking the whole command line ----------------------------------------------------------------------------------


def did_you_mean(name: str, names: list[str], prefix: str = "--") -> str:
    """` (did you mean --num_epochs?)` for the closest of `names` to a mistyped `name`, or ``."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def command_line_problems(function: Callable[..., Any], argv: list[str]) -> list[str]:
    """Every problem with `argv` for `function`: unknown flags (with a suggestion), stray arguments, and the values of
    the known flags that are of the wrong type or out of their declared range, so that one run names them all."""
    signature = inspect.signature(function)
    parameters = signature.parameters
    names = [name for name, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_positional = any(p.kind is p.VAR_POSITIONAL for p in parameters.values())
    flags, positional, negated = scan_flags(argv)
    problems = []
    for flag in flags:
        if flag in parameters:
            continue
        if flag in negated and flag.startswith("no") and flag[2:] in parameters:  # fire's --noNAME: NAME False
            continue
        problems.append(f"unknown flag --{flag}{did_you_mean(flag, names)}")
    if positional and not takes_positional:
        problems.append(f"unexpected argument {positional[0]!r}: flags are written --name value")
    after = argv[argv.index("--") + 1:] if "--" in argv else []
    if after:  # fire would take them as its own flags: --interactive opens a Python console after the run
        problems.append(f"unexpected {' '.join(after)!r} after `--`: these scripts take no fire flags")
    return problems + value_problems(function, flags)


def value_problems(function: Callable[..., Any], raw_flags: Mapping[str, str | bool]) -> list[str]:
    """The type and range problems of the known flags in `raw_flags` (as `scan_flags` read them), each value parsed
    as fire parses it; checked before fire runs, so that they are reported together with any unknown flag."""
    from fire.parser import DefaultParseValue

    parameters = inspect.signature(function).parameters
    hints, checks = _flag_hints(function), getattr(function, "__option_checks__", {})
    problems = []
    for name, raw in raw_flags.items():
        parameter = parameters.get(name)
        if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = DefaultParseValue(raw) if isinstance(raw, str) else raw
        problem = checked_value(name, value, raw, hints.get(name, parameter.annotation), checks.get(name))[1]
        if problem:
            problems.append(problem)
    return problems


def checked_value(name: str, value: Any, raw: str | bool | None, hint: Any, check: Check | None,
                  ) -> tuple[Any, str | None]:
    """(the value for `main`, or the problem with it): its type (`coerce`, when it was typed), then its range."""
    flag = f"--{name}"
    if raw is not None:
        value, problem = coerce(flag, value, raw, hint)
        if problem:
            return value, problem
    return value, check.problem(flag, value) if check is not None else None


def checked_call(function: Callable[..., Any], argv: list[str]) -> Callable[..., Any]:
    """A stand-in for `function` that fire calls: it binds what fire parsed, replaces `str` flags by their raw text,
    checks types and declared ranges, and only then calls `function`."""
    import functools

    signature = inspect.signature(function)
    hints = _flag_hints(function)
    checks: Mapping[str, Check] = getattr(function, "__option_checks__", {})
    raw_flags, _, _ = scan_flags(argv)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        problems = []
        for name, value in list(bound.arguments.items()):
            parameter = signature.parameters[name]
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            value, problem = checked_value(name, value, raw_flags.get(name), hints.get(name, parameter.annotation),
                                           checks.get(name))
            if problem:
                problems.append(problem)
            elif name in raw_flags:
                bound.arguments[name] = value
        if problems:
            raise UserError("; ".join(problems))
        return function(*bound.args, **bound.kwargs)

    return call


def _flag_hints(function: Callable[..., Any]) -> dict[str, Any]:
    """{parameter: its type hint}, also for the flags `dataclass_flags` laid out."""
    hints = dict(getattr(function, "__flag_hints__", {}))
    hints.update(typing.get_type_hints(inspect.unwrap(function)) if _has_hints(function) else {})
    return hints


def _has_hints(function: Callable[..., Any]) -> bool:
    try:
        typing.get_type_hints(inspect.unwrap(function))
    except (NameError, TypeError, AttributeError):  # a hint that does not resolve: use the raw annotations
        return False
    return True


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or any(a.startswith("--debug=") and a != "--debug=False" for a in argv) or (
        os.environ.get("LOGLEVEL", "").upper() == "DEBUG"
    )


def _select(component: Callable[..., Any] | Mapping[str, Callable[..., Any]], argv: list[str], program: str,
            ) -> tuple[Callable[..., Any], list[str], str]:
    """(the function to call, its argv, its name) for a function or a {command: function} mapping."""
    if not isinstance(component, Mapping):
        return component, argv, program
    commands = ", ".join(component)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python {program} COMMAND --FLAG VALUE ...\n\ncommands: {commands}\n"
              f"`python {program} COMMAND --help` lists a command's flags.")
        raise SystemExit(0)
    if argv[0] not in component:
        hint = did_you_mean(argv[0], list(component), prefix="")
        raise UserError(f"unknown command {argv[0]!r}{hint}; commands: {commands}")
    return component[argv[0]], argv[1:], f"{program} {argv[0]}"


def run_cli(component: Callable[..., Any] | Mapping[str, Callable[..., Any]], argv: list[str] | None = None) -> None:
    """`fire.Fire(component)` behind the strict checks above; a `UserError` becomes `error: ...` and exit code 2."""
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if not (a == "--debug" or a.startswith("--debug="))]
    if debug:
        logging.basicConfig(level=logging.DEBUG)
    program = os.path.basename(sys.argv[0]) or "script.py"
    try:
        function, rest, name = _select(component, argv, program)
        if any(token in ("-h", "--help") for token in rest[: rest.index("--") if "--" in rest else None]):
            print(render_help(name, function))
            raise SystemExit(0)
        problems = command_line_problems(function, rest)
        if problems:
            raise UserError("; ".join(problems) + f" (`python {name} --help` lists the flags)")
        call = checked_call(function, rest)
        target: Any = {key: value for key, value in component.items()} if isinstance(component, Mapping) else call
        if isinstance(component, Mapping):
            target[argv[0]] = call
        with library_bars_only_on_a_terminal():
            fire.Fire(target, command=argv if isinstance(component, Mapping) else rest, name=program,
                      serialize=lambda result: None)  # scripts print what they mean to
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
        reason = write_failure(error)
        if reason is None or debug:
            raise
        where = getattr(error, "filename", None)
        fail(f"cannot write{f' {where}' if where else ''}: {reason} ({first_line(error)}); free space (or fix "
             "the file system) and run again")


@contextlib.contextmanager
def library_bars_only_on_a_terminal() -> Iterator[None]:
    """The Hugging Face libraries' progress bars (hub downloads, transformers' "Loading weights") only while stderr is
    a terminal: in a log file (nohup, sbatch) every redraw is a `\r`-joined chunk and the last one prints twice.
    transformers takes its initial state from huggingface_hub's when it is imported, so a later import is covered too;
    the states are restored afterwards (in-process runs). datasets' bars: utils/data.py."""
    if sys.stderr.isatty():
        yield
        return
    from huggingface_hub import utils as hub

    hub_on = not hub.are_progress_bars_disabled()
    hf_logging = sys.modules.get("transformers.utils.logging")
    transformers_on = hf_logging.is_progress_bar_enabled() if hf_logging else hub_on
    hub.disable_progress_bars()
    if hf_logging:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_on:
            hub.enable_progress_bars()
        hf_logging = sys.modules.get("transformers.utils.logging")
        if hf_logging and transformers_on:
            hf_logging.enable_progress_bar()


@dataclass
class Outcome:
    """What `python <script>.py argv...` ended with."""

    returncode: int
    stdout: str
    stderr: str


def run_in_process(component: Callable[..., Any] | Mapping[str, Callable[..., Any]], *argv: Any) -> Outcome:
    """`python <script>.py argv...` in this process (the same `run_cli` entry point), without paying for a fresh
    interpreter and a torch import: for tests and gpu_check. `component` as for `run_cli` (a dict: subcommands)."""
    import io

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = [f"{getattr(component, '__module__', 'script')}.py", *map(str, argv)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(component)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return Outcome(code, out.getvalue(), err.getvalue())


def fail(message: str) -> None:
    """Print `error: message` (secrets hidden) and exit with the user-error code."""
    print(f"error: {redact(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (a test's capture): nothing will be flushed to the pipe


# --- a dataclass of flags --------------------------------------------------------------------------------------------


def dataclass_flags(parameter: str, cls: type, **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Lay out the fields of the dataclass `cls` as flags of `main`, in place of its parameter `parameter`; `main`
    receives them packed into a `cls`. The dataclass holds each flag's type, default (overridable per script with
    `defaults`) and comment, and its ranges in a `__option_checks__` class attribute.

        @dataclass_flags("generation", GenerationArgs, num_beams=1)
        def main(base_model: str = "", generation: GenerationArgs = DEFAULT_GENERATION) -> None: ...
    """
    import dataclasses
    import functools

    hints = typing.get_type_hints(cls)
    fields = [field.name for field in dataclasses.fields(cls)]
    unknown = set(defaults) - set(fields)
    if unknown:
        raise TypeError(f"not fields of {cls.__name__}: {', '.join(sorted(unknown))}")

    def decorate(main: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(main)
        if parameter not in signature.parameters:
            raise TypeError(f"{main.__name__} has no parameter {parameter!r}")
        keyword = inspect.Parameter.KEYWORD_ONLY
        flags = [inspect.Parameter(name, keyword, annotation=hints[name],
                                   default=defaults.get(name, getattr(cls, name))) for name in fields]
        parameters: list[inspect.Parameter] = []
        for current in signature.parameters.values():
            if current.name == parameter:
                parameters += flags
            elif current.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                parameters.append(current.replace(kind=keyword))
            else:
                parameters.append(current)
        flat = signature.replace(parameters=sorted(parameters, key=lambda p: p.kind))

        @functools.wraps(main)
        def with_flags(*args: Any, **kwargs: Any) -> Any:
            bound = flat.bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            packed = cls(**{name: values.pop(name) for name in fields})
            return main(**values, **{parameter: packed})

        with_flags.__signature__ = flat  # type: ignore[attr-defined]
        with_flags.__flag_sources__ = (*getattr(main, "__flag_sources__", ()), cls)  # type: ignore[attr-defined]
        with_flags.__flag_hints__ = {**getattr(main, "__flag_hints__", {}), **hints}  # type: ignore[attr-defined]
        with_flags.__option_checks__ = {  # type: ignore[attr-defined]
            **getattr(cls, "__option_checks__", {}), **getattr(main, "__option_checks__", {})}
        return with_flags

    return decorate
