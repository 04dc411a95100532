"""The documentation site builds with `mkdocs build --strict`, and its API reference covers the public names.

Strict mode turns every warning into a failure: a link to a page or anchor that does not exist, a
page outside the navigation, and a docstring mkdocstrings cannot parse (a parameter documented that
the signature does not have, say). Two things strict mode lets through fail here too: a list that
starts right under a line of text (Python-Markdown runs it into that paragraph), and mkdocstrings
printing signatures unformatted because neither Ruff nor Black is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import selective_po

REPO = Path(__file__).resolve().parents[1]
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")
UNFORMATTED_SIGNATURES = "Formatting signatures requires either Black or Ruff"


def lists_run_into_a_paragraph(text: str) -> list[int]:
    """Line numbers of list items that follow a line of text with no blank line between them.

    Python-Markdown, unlike GitHub, starts a list only after a blank line (or another list item), so
    `text` then `- item` renders as one run-on paragraph. Lines in fenced code, and items after a
    heading or inside a list (its continuation lines included), are fine.
    """
    found, fence, in_list, previous = [], None, False, ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence or stripped.startswith(("```", "~~~")):
            fence = None if fence and stripped.startswith(fence) else fence or stripped[:3]
            previous = ""
            continue
        if LIST_ITEM.match(line):
            if previous.strip() and not in_list and not previous.lstrip().startswith("#"):
                found.append(number)
            in_list = True
        elif stripped and not line[0].isspace() and (not previous.strip() or stripped.startswith("#")):
            in_list = False  # text after a blank line, or a heading, ends the list; a line right under an item continues it
        previous = line
    return found


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO, capture_output=True,
        text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert UNFORMATTED_SIGNATURES not in result.stdout + result.stderr, (
        'mkdocstrings printed every signature on one line: install the docs requirements (`pip install -e ".[dev]"`)'
    )
    run_on = {
        str(page.relative_to(REPO)): lines
        for page in sorted((REPO / "docs").rglob("*.md"))
        if (lines := lists_run_into_a_paragraph(page.read_text()))
    }
    assert not run_on, f"lists that render as run-on paragraphs (put a blank line above them), page: lines {run_on}"
    api = (site / "api" / "index.html").read_text()
    for name in selective_po.__all__:  # rendered, with its docstring's first line
        assert f'id="selective_po.{name}"' in api, name
    assert (site / "trl_parity" / "index.html").is_file() and (site / "results" / "index.html").is_file()


def test_the_api_reference_names_every_public_name():
    documented = re.findall(r"^::: selective_po\.(\w+)$", (REPO / "docs" / "api.md").read_text(), flags=re.M)
    assert sorted(documented) == sorted(selective_po.__all__)
