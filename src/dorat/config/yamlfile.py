"""Reading YAML and text files users give: UTF-8 checked, and a duplicate key is an error
(PyYAML's safe_load silently keeps the last value)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dorat.errors import ConfigError


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's contents; unreadable or not UTF-8 is one ConfigError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8"
                          ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path} ({e.strerror})") from None


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"key '{key}' appears twice (lines {first} and {second}); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise DuplicateKey(key, first.line + 1, key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load``, except that a duplicate key in a mapping is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
