"""Stage configuration: a YAML file whose every key is also a command-line flag.

Arguments are HfArgumentParser dataclasses (the stage's own and transformers'
``TrainingArguments``). The YAML gives defaults, flags override them; a YAML key that no
dataclass has is an error naming the file and the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from occmllm.errors import OccError
from occmllm.fileio import read_text


def _yaml_as_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            flags += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            import json
            flags += [f"--{key}", json.dumps(value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def read_config(path: Path) -> dict:
    """A YAML config file's option: value mapping; a one-line error for a missing file, invalid YAML
    (with its line) or anything but a mapping."""
    if not path.is_file():
        raise OccError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise OccError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(values, dict):
        raise OccError(f"{path}: expected a mapping of option: value")
    return values


def parse_config(dataclass_types: tuple, argv: list[str] | None = None, default_config: Path | None = None):
    """Parse ``--config FILE`` (default ``default_config``) plus flags into the dataclasses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=default_config)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", type=Path, default=default_config,
                        help=f"YAML file of defaults for any flag below [{default_config}]")
    yaml_flags: list[str] = []
    if known.config is not None:
        path = known.config
        values = read_config(path)
        valid = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise OccError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                           f"see --help for the valid options")
        yaml_flags = _yaml_as_flags(values)
        # --help shows the config's values as the defaults (the flags above still set them)
        parser.set_defaults(**{key: value for key, value in values.items() if value is not None})
    if "-h" in rest or "--help" in rest:
        parser.parse_args(["--help"])
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(yaml_flags + rest, return_remaining_strings=True)
    except ValueError as exc:
        raise OccError(f"bad arguments: {exc}") from None
    if remaining:
        raise OccError(f"unknown option(s) {' '.join(remaining)}; see --help")
    return tuple(parsed[: len(dataclass_types)])  # the last holds --config itself
