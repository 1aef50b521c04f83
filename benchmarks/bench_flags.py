"""The benchmarks' command lines: argparse, made as strict as the scripts' (utils/core/cli.py).

- no abbreviations: `--rep 3` is not taken for `--repeat 3`;
- a mistyped flag is refused with "did you mean --rows?" (the scripts' suggestion, `utils.core.cli.did_you_mean`);
- each benchmark builds its parser in a `build_parser()` above its torch import and, run as a script, parses the
  command line there, so a typo is answered at once instead of after the 13-16 s torch import.

This module imports nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import did_you_mean  # no torch, no transformers


class StrictParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` without abbreviations, naming the closest flag for each unknown one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: set[str] = set()  # filled by add_argument (argparse lists its options only in private fields)
        self.arguments: list[argparse.Action] = []
        self.subcommands: list[Any] = []
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags.update(name for name in action.option_strings if name.startswith("--"))
        self.arguments.append(action)
        return action

    def add_subparsers(self, **kwargs: Any) -> Any:
        subcommands = super().add_subparsers(**kwargs)
        self.subcommands.append(subcommands)
        return subcommands

    def parsers(self) -> list[StrictParser]:
        """This parser and those of its subcommands."""
        return [self, *(sub for subcommands in self.subcommands for sub in subcommands.choices.values())]

    def flag_names(self) -> list[str]:
        """Every `--flag` of this parser and of its subcommands."""
        return sorted({name for parser in self.parsers() for name in parser.flags})

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        argv = argv[: argv.index("--")] if "--" in argv else argv
        known = self.flag_names()
        problems = []
        for token in argv:
            flag = token.split("=", 1)[0]
            if token.startswith("--") and " " not in token and flag not in known:  # "--a b": a value, as argparse
                problems.append(f"unknown flag {flag}{did_you_mean(flag[2:], [name[2:] for name in known])}")
        if problems:
            self.error("; ".join(problems))
        return super().parse_args(args, namespace)
