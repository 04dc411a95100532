"""The documentation site builds with `mkdocs build --strict`, and its API reference covers the public names.

Strict mode turns every warning into a failure: a link to a page or anchor that does not exist, a
page outside the navigation, and a docstring mkdocstrings cannot parse (a parameter documented that
the signature does not have, say).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import selective_po

REPO = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO, capture_output=True,
        text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    api = (site / "api" / "index.html").read_text()
    for name in selective_po.__all__:  # rendered, with its docstring's first line
        assert f'id="selective_po.{name}"' in api, name
    assert (site / "trl_parity" / "index.html").is_file() and (site / "results" / "index.html").is_file()


def test_the_api_reference_names_every_public_name():
    documented = re.findall(r"^::: selective_po\.(\w+)$", (REPO / "docs" / "api.md").read_text(), flags=re.M)
    assert sorted(documented) == sorted(selective_po.__all__)
