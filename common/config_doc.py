"""Write (or check) what is generated from the schema: ``docs/configuration.md`` and the
``[tool.flwr.app.config]`` block of ``pyproject.toml``.

    python -m common.config_doc          # rewrite both from common/schema.py
    python -m common.config_doc --check  # exit 1 and name the stale file (tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from common.schema import AUTO, GROUPS, SCHEMA, Key

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
PYPROJECT = ROOT / "pyproject.toml"
HEADER = "[tool.flwr.app.config]"

_INTRO = """\
# Configuration reference

<!-- Generated from common/schema.py by `python -m common.config_doc`: edit the schema,
not this page. -->

Every key lives in `[tool.flwr.app.config]` of `pyproject.toml` and is validated once,
before any training (`common/config.py`): a bad value fails with the key, the value and
what is allowed, and an unknown key (a typo) is refused; a combination of keys that
cannot run names every key involved (`common/config_rules.py`). A key whose default is `auto`
takes its algorithm's own value (each algorithm's `defaults` in `common/algorithms/`, the
neutral value where it names none); a run's `config.json` records the value it ran with.
Override keys on the command line (strings in TOML quotes) or with a TOML file:

```bash
flwr run . --stream --federation-config "num-supernodes=10 client-resources-num-cpus=1" \\
  --run-config 'algorithm="fedavg" num-server-rounds=20 lr=0.05'
flwr run . --stream --federation-config "num-supernodes=10 client-resources-num-cpus=1" \\
  --run-config my-setting.toml
```

Always pass `--federation-config`: the local SuperLink forgets `num-supernodes` when it
restarts. A node's `--node-config` may set `local-model`, `data-path`, `state-dir` and
`client-key` (its stable identity), besides Flower's `partition-id` / `num-partitions`.
"""


def toml_value(value: Any) -> str:
    """A default as TOML writes it."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _allowed(key: Key) -> str:
    if issubclass(key.type, Enum):
        words = " \\| ".join(f"`{m.value}`" for m in key.type)
    else:
        words = key.allowed.replace("|", "\\|") or key.type.__name__
    return f"`{AUTO}` or {words}" if key.auto else words


def render_doc() -> str:
    """The reference page: one table per group, then the keys a resume may change."""
    out = [_INTRO.rstrip("\n")]
    for group in GROUPS:
        out += [f"\n## {group.capitalize()}\n", "| key | default | allowed | meaning |",
                "|---|---|---|---|"]
        for k in (k for k in SCHEMA if k.group == group):
            meaning = k.doc.replace("|", "\\|")
            out.append(f"| `{k.name}` | `{toml_value(k.default)}` | {_allowed(k)} | {meaning} |")
    resumable = ", ".join(f"`{k.name}`" for k in SCHEMA if k.resumable)
    out.append(f"\nA run continued with `resume-from` may change only {resumable}; every other "
               "key must equal the checkpoint's.")
    return "\n".join(out) + "\n"


def render_block() -> str:
    """The ``[tool.flwr.app.config]`` block, grouped, each key with its allowed values."""
    out = [HEADER, "# Generated from common/schema.py by `python -m common.config_doc`: edit the",
           "# schema, not this block. Reference: docs/configuration.md."]
    for group in GROUPS:
        out.append(f"# --- {group}")
        for k in (k for k in SCHEMA if k.group == group):
            hint = (" | ".join(m.value for m in k.type) if issubclass(k.type, Enum)
                    else k.allowed)
            hint = f"{AUTO} | {hint}" if k.auto else hint
            line = f"{k.name} = {toml_value(k.default)}"
            out.append(f"{line:<32}# {hint}" if hint else line)
    return "\n".join(out) + "\n"


def _with_block(pyproject: str) -> str:
    start = pyproject.index(HEADER)
    end = pyproject.find("\n[", start + len(HEADER))
    end = len(pyproject) if end < 0 else end + 1
    return pyproject[:start] + render_block() + "\n" + pyproject[end:]


def stale() -> list[Path]:
    """The generated files that differ from what the schema gives now."""
    out = []
    if not DOC.is_file() or DOC.read_text() != render_doc():
        out.append(DOC)
    text = PYPROJECT.read_text()
    if HEADER not in text or _with_block(text) != text:
        out.append(PYPROJECT)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale files")
    args = p.parse_args(argv)
    if args.check:
        for path in stale():
            print(f"{path} is stale: run `python -m common.config_doc`", file=sys.stderr)
        return 1 if stale() else 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render_doc())
    PYPROJECT.write_text(_with_block(PYPROJECT.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
