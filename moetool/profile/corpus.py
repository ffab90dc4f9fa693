"""Reading a profile corpus: .txt (one prompt per line), .jsonl ({"text": ..., "domain": ...}), or
`-` (stdin, either form: JSON lines when the first non-blank line starts with `{`).

`read_corpus(path)` validates the whole corpus before any work (bad input is one line, exit 2):
not UTF-8 (with the line), bad JSON on line N, a line without a "text" string, no prompt at all.
It returns `Prompt`s; blank lines are skipped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

from ..errors import MoetoolError


@dataclass
class Prompt:
    index: int  # position among the corpus' prompts (blank lines skipped)
    text: str
    domain: Optional[str] = None


def read_corpus(path: str) -> list[Prompt]:
    name = "<stdin>" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as e:
        raise MoetoolError(f"{name}: cannot read the corpus ({e.strerror or e.__class__.__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise MoetoolError(f"{name}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    lines = text.splitlines()
    first = next((l for l in lines if l.strip()), "")
    jsonl = path.endswith(".jsonl") or (path == "-" and first.lstrip().startswith("{"))
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(Prompt(len(prompts), line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoetoolError(f"{name}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise MoetoolError(f'{name}:{n}: expected an object with a "text" string')
        domain = obj.get("domain")
        if domain is not None and not isinstance(domain, str):
            raise MoetoolError(f'{name}:{n}: "domain" must be a string')
        if obj["text"].strip():
            prompts.append(Prompt(len(prompts), obj["text"], domain))
    if not prompts:
        raise MoetoolError(f"{name}: the corpus has no prompts")
    return prompts
