"""MkDocs hook for `make docs`: links from the documentation to files of the repository outside
docs/ (configs, benchmarks, examples, source) are checked like the site's own links, and shown
as the file's path.

A link whose target lies outside docs/ and does not exist is a warning, so `mkdocs build
--strict` fails on it; one that exists becomes the repository path in code type (the site is
built without a repository URL to link to)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.dorat")
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    here = (docs / page.file.src_uri).parent

    def outside(m: re.Match[str]) -> str:
        label, target = m.group(1), m.group(2)
        if re.match(r"^[a-z]+:", target):  # http:, mailto:
            return m.group(0)
        path = (here / target).resolve()
        if path.is_relative_to(docs):
            return m.group(0)  # MkDocs checks the site's own links
        if not path.is_relative_to(root) or not path.exists():
            log.warning("%s links to %s, which is not in the repository", page.file.src_uri, target)
            return m.group(0)
        rel = path.relative_to(root).as_posix()
        return f"`{rel}`" if label.strip("`") == rel else f"{label} (`{rel}`)"

    return LINK.sub(outside, markdown)
