"""Reading the simulator's and the policy's prompt text from `prompts/*.txt`.

Two kinds of file: chat templates (`analyzer_en.txt`, ...: a system part, optionally a user part
after TEMPLATE_USER_MARKER, with `{name}` fields) and knob tables (`knobs_en.txt`, ...: named
sentences that the simulator's settings switch in and out, one table per language).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

__all__ = ["KNOB_FILE", "PROMPT_DIR", "TEMPLATE_USER_MARKER", "knob_text", "load_template", "render"]

# Separates the system part from the user part inside a template file.
TEMPLATE_USER_MARKER = "<<<USER>>>"
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
KNOB_FILE = "knobs_{lang}.txt"
_KNOB_HEADER_RE = re.compile(r"^\[([A-Za-z0-9_.]+)\]$")


@functools.lru_cache(maxsize=None)
def load_template(name: str) -> tuple[str, str | None]:
    """Reads prompts/<name>.txt; returns (system part, user part or None)."""
    text = (PROMPT_DIR / f"{name}.txt").read_text(encoding="utf-8")
    if TEMPLATE_USER_MARKER in text:
        system, user = text.split(TEMPLATE_USER_MARKER, 1)
        return system.strip(), user.strip()
    return text.strip(), None


def render(name: str, **values: str) -> list[dict[str, str]]:
    """Chat messages of template `name` with its fields filled from `values`."""
    system, user = load_template(name)
    messages = [{"role": "system", "content": system.format(**values)}]
    if user is not None:
        messages.append({"role": "user", "content": user.format(**values)})
    return messages


@functools.lru_cache(maxsize=None)
def _knob_table(lang: str) -> dict[str, str]:
    path = PROMPT_DIR / KNOB_FILE.format(lang=lang)
    if not path.is_file():
        raise ValueError(f"no knob table for language {lang!r}: {path.name} is missing")
    table: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        header = _KNOB_HEADER_RE.match(line)
        if header:
            if header.group(1) in table:
                raise ValueError(f"{path.name}:{number}: entry [{header.group(1)}] appears twice")
            current = table[header.group(1)] = []
        elif current is not None:
            current.append(line)
    out = {}
    for name, lines in table.items():
        while lines and lines[-1] == "":
            lines.pop()
        out[name] = "\n".join(lines)
    return out


def knob_text(lang: str, name: str) -> str:
    """The sentence `name` of the language's knob table, verbatim."""
    table = _knob_table(lang)
    if name not in table:
        raise ValueError(f"{KNOB_FILE.format(lang=lang)} has no entry [{name}]")
    return table[name]
