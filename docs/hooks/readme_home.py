"""mkdocs hook: the site's home page is README.md, so the front door is written once.

docs/index.md is a stub; at build time its text is replaced by README.md's, with the README's links into
docs/ (``](docs/install.md)``) made relative to the site (``](install.md)``). A README link to any other
repository file has no page in the site, so `mkdocs build --strict` fails on it: link a docs page instead.
"""

from __future__ import annotations

from pathlib import Path

README_FPATH = Path(__file__).resolve().parents[2] / "README.md"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    return README_FPATH.read_text(encoding="utf-8").replace("](docs/", "](")
