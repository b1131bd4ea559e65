"""One-line error messages for the command-line entry points (train, evaluate, export, plan).

Bad input (a config key, a profile file, a model directory) ends a command with one line
`error: ...` on stderr that names what and where, and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn, Sequence


def one_line(e: BaseException) -> str:
    """An exception's message on one line (a KeyError's text without its repr quotes)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split())


def config_error(e: Exception, argv: Sequence[str]) -> str:
    """One line naming the offending --config.* override (ml_collections raises nested
    KeyErrors whose text is a quoted repr with a 'Did you mean' hint)."""
    text = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    text = text.replace("\\\"", '"').strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # a repr's quotes
        text = text[1:-1].strip()
    text = text.replace("' Did you mean", "; did you mean")
    if text[:1] in ("'", '"') and text.count(text[0]) == 1:  # its pair went with the hint
        text = text[1:]
    key = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                and a.split("=")[0].rsplit(".", 1)[-1] in text), None)
    if key and text.strip("'\"") == key.rsplit(".", 1)[-1]:
        return f"error: unknown config key {key}"  # ml_collections says only the name
    return f"error: bad config override{f' {key}' if key else ''}: {text}"


def exit_with(message: str, code: int = 1) -> NoReturn:
    """Prints `error: message` (one line) to stderr and exits with `code`."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def parse_flags_or_exit(argv):
    """absl's flag parser, with config-key mistakes reported as one clear line (exit 2)."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
        print(config_error(e, argv), file=sys.stderr)
        sys.exit(2)
