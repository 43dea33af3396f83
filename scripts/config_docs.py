"""Writes docs/configuration.md from the pydantic models in worker/config.py (the single source of truth).

    python -m scripts.config_docs          # rewrite the file
    python -m scripts.config_docs --check  # exit 1 if the file is stale (the tests run this)
"""

from __future__ import annotations

import argparse
import sys
from enum import Enum
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from worker.config import ENV_PREFIX, MAX_MB, Config

OUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{value!r}`" if value is not None else "unset"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        nested = next((a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)
                       and issubclass(a, BaseModel)), None)
        if nested is not None:
            if field.description:
                rows.append(f"| `{key}` | (section) | {field.description} |")
            is_map = getattr(annotation, "__origin__", None) is dict
            rows += _rows(nested, key + (".<id>." if is_map else "."))
            continue
        is_enum = isinstance(annotation, type) and issubclass(annotation, Enum)
        doc = (field.description or (annotation.__doc__ if is_enum else "") or "").strip()
        if is_enum:
            doc += " One of: " + ", ".join(f"`{m.value}`" for m in annotation)
        rows.append(f"| `{key}` | {_default(field)} | {doc.replace('|', '&#124;')} |")
    return rows


def render() -> str:
    lines = [
        "# Worker configuration (`config.yaml`)",
        "",
        "Generated from `worker/config.py` by `python -m scripts.config_docs`; the tests fail when it is stale.",
        "Unknown keys are errors, named with the key of their section they may have meant, or else as not a setting",
        "of this version (a config written for a newer version, met by a worker rolled back, or a typo: only the",
        "keys below are read). Relative paths are relative to the config file and `~/` is the home folder of the",
        "worker's user (a symbolic link stays a link: a reload, or `model.watch_s`, reads the bundle a `current` link",
        "points to then). Any key can be overridden",
        f"from the environment as `{ENV_PREFIX}SECTION__KEY` (e.g. `{ENV_PREFIX}MQTT__PASSWORD`); the name is read in",
        "lower case, so a camera id with capitals (`cameras.<id>`) cannot be reached that way. A text key (an id, a",
        "name, a path, a password) takes its value as written, where YAML 1.1 would read `off`, `no` or `007` as",
        "false or the number 7; a key given twice in one mapping is an error naming both lines. A number key",
        "refuses `yes`, `no`, `on`, `off`, `true` and `false` (YAML's booleans, not 1 and 0). Numbers must be",
        "finite (`.nan` and `.inf` are refused), intervals and timeouts at most a year (366 days), and budgets in",
        f"megabytes (`max_mb`) at most {MAX_MB:_} (a petabyte). An error in",
        "an override names its variable (`EDGE_INSPECT__MQTT__PASWORD (environment): mqtt.pasword: ...`), and a",
        "variable with one underscore after the prefix (`EDGE_INSPECT_MQTT_PORT`) is ignored with a warning. An",
        "override of `null` (or `Null`, `NULL`, `~`) unsets an optional key, as in config.yaml: e.g.",
        f"`{ENV_PREFIX}MODEL__CACHE_DIR=null` turns the model cache off (a password is taken as written; an",
        "empty value is refused for a path, which it would make the config file's folder).",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
        *_rows(Config, ""),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Unknown arguments (``--help`` aside, which prints the usage) are refused: only no argument rewrites the file."""
    parser = argparse.ArgumentParser(prog="python -m scripts.config_docs",
                                     description=f"Write {OUT.relative_to(OUT.parents[1])} from worker/config.py.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python -m scripts.config_docs", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
