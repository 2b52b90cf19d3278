"""mkdocs hooks: the site's home page is README.md, and lists render as they do on GitHub.

docs/index.md is a stub; at build time its text is replaced by README.md's, with the README's links into
docs/ (``](docs/install.md)``) made relative to the site (``](install.md)``). A README link to any other
repository file has no page in the site, so `mkdocs build --strict` fails on it: link a docs page instead.

GitHub starts a list on the line right after a paragraph; Python-Markdown (mkdocs) needs a blank line there
and would otherwise run the items into the paragraph. The pages are written for GitHub, so the build adds
that blank line (outside code blocks) instead of every page carrying it.
"""

from __future__ import annotations

import re
from pathlib import Path

README_FPATH = Path(__file__).resolve().parents[2] / "README.md"
_ITEM_RE = re.compile(r"^(?:[-*+]|\d+\.) ")


def _blank_line_before_lists(markdown: str) -> str:
    out, in_fence, prev = [], False, ""
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and _ITEM_RE.match(line) and prev.strip() and not _ITEM_RE.match(prev) and prev[:1] != " ":
            out.append("")
        out.append(line)
        prev = line
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "index.md":
        markdown = README_FPATH.read_text(encoding="utf-8").replace("](docs/", "](")
    return _blank_line_before_lists(markdown)
