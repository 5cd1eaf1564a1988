"""Command-line parsing shared by ``run_recbole_blossom.py``, ``run_hyper.py`` and ``benchmarks/compare.py``.

Each entry point declares its own options with ``argparse``; every other argument sets a config key.
Config keys are written ``--key=value`` or ``--key value`` (the same in every entry point), and they reach
RecBole as a config dict typed the way RecBole types its command line (``"1"`` -> 1, ``"[1,2]"`` -> a list,
``"true"`` -> True, anything else stays a string). RecBole's ``Config`` also reads ``sys.argv`` itself;
:func:`hidden_argv` hides the entry point's arguments from it so that every key is read once, here.
"""

import argparse
import contextlib
import difflib
import sys

from recbole.config import Config

from recbole_blossom.checks import TYPO_CUTOFF, InputError
from recbole_blossom.config import known_keys


class UsageError(InputError):
    """Bad command-line input; the message says what is allowed."""


def split_overrides(rest):
    """``{key: raw string}`` of the arguments argparse did not know, in the ``--key=value`` or ``--key value`` form.

    A bare value, a key without a value or a key given twice with different values is a :class:`UsageError`.
    """
    overrides, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or len(arg) == 2 or arg[2:].startswith("="):
            raise UsageError(f"unrecognised argument {arg!r}: config keys are written --key=value "
                             f"(or --key value); options are listed by --help")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            key, value = arg[2:], rest[i + 1]
            i += 2
        else:
            raise UsageError(f"{arg} has no value: write {arg}=VALUE (or {arg} VALUE)")
        if key in overrides and overrides[key] != value:
            raise UsageError(f"--{key} is given twice, with {overrides[key]!r} and {value!r}")
        overrides[key] = value
    return overrides


def typed(overrides):
    """The raw ``{key: string}`` overrides typed as RecBole types command-line values."""
    return Config._convert_config_dict(None, dict(overrides))


def parse(parser, argv):
    """``(args, overrides)``: the parser's options and ``{key: raw string}`` of every other ``--key`` argument.

    ``args.overrides`` holds the same dict. Option values are checked by the parser (argparse exits with
    status 2 and its usage line on a bad one, as every argparse program does).
    """
    args, rest = parser.parse_known_args(argv)
    _check_option_typos(parser, [a[2:].split("=", 1)[0] for a in rest if a.startswith("--")])
    args.overrides = split_overrides(rest)
    return args, args.overrides


def _check_option_typos(parser, keys):
    """UsageError for a ``--key`` that is (nearly) one of the entry point's options and no config key, e.g.
    ``--no_plot`` for ``--no-plot`` (it would otherwise be passed on as an unknown config key). ``model`` and
    ``dataset`` are set by the entry point's own options, so ``--model`` next to ``--models`` is a typo too."""
    options = {o[2:].replace("-", "_"): o for o in parser._option_string_actions if o.startswith("--")}
    known = known_keys() - {"model", "dataset"}
    for key in keys:
        if key in known:
            continue
        close = difflib.get_close_matches(key.replace("-", "_"), options, n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise UsageError(f"--{key} is not an option of this command; did you mean {options[close[0]]}?")


def as_arguments(overrides):
    """The overrides written back as ``--key=value`` arguments (for logs and stored settings)."""
    return [f"--{key}={value}" for key, value in overrides.items()]


def new_parser(doc, epilog="Other --key=value (or --key value) arguments set config keys."):
    """An ``ArgumentParser`` described by the first line of ``doc``."""
    # allow_abbrev=False: a config key such as --data=... must not silently become an option (--dataset)
    return argparse.ArgumentParser(description=doc.splitlines()[0], epilog=epilog, allow_abbrev=False)


@contextlib.contextmanager
def hidden_argv():
    """Hide the command line from RecBole's ``Config`` (it would read ``--key=value`` a second time and log
    "will not be used" for everything else); the entry point passes the overrides as a config dict instead."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved
