# SPDX-License-Identifier: GPL-3.0-or-later
"""No file of the repository points outside it; every pointer to a document inside it resolves.

A clone on another machine has only the repository: a docstring that cites a
path of the machine it was written on, or a design note that lives
elsewhere, is a dead end there.  Every tracked text file is read:

- no absolute path of a development machine (under ``/work``, ``/root`` or
  ``/home/<user>``) and no name of the design notes that stayed outside
  the repository (the method is docs/method.md, the design docs/architecture.md).
  Inputs of the environment that the scripts look for (caches, a ComfyUI
  source archive beside the checkout) are configuration, not documents, and
  are not flagged;
- every mention of a file under ``docs/`` names a file that exists;
- every relative link in a Markdown file resolves to a file or folder inside
  the repository.
"""
from __future__ import annotations

import re

from support.repo_files import REPO_ROOT, tracked_files

#: What points at a machine or at notes outside the repository.  Written in pieces so that this file does
#: not match itself.
OUTSIDE = re.compile("|".join([
    r"/wor" r"k/",  # the development machine's work tree
    r"/roo" r"t/",
    r"/hom" r"e/[A-Za-z0-9_.-]+/",
    r"klora" r"-spec",  # the algorithm notes the docs replace
    r"comfyui" r"-notes",
    r"\bshare" r"d/klora",
]))
DOCS_MENTION = re.compile(r"\bdocs/[\w.-]+\.(?:md|svg|png)\b")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
BINARY_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".ico", ".safetensors", ".pt", ".zip", ".gz")


def _text_files():
    for name in tracked_files():
        if name.lower().endswith(BINARY_SUFFIXES):
            continue
        try:
            yield name, (REPO_ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a binary file without a telling suffix


def test_no_file_points_outside_the_repository():
    hits = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for name, text in _text_files() for m in OUTSIDE.finditer(text)]
    assert not hits, "files that point outside the repository:\n" + "\n".join(hits)


def test_mentions_of_docs_exist():
    missing = sorted({f"{name}: {m.group(0)}" for name, text in _text_files() for m in DOCS_MENTION.finditer(text)
                      if not (REPO_ROOT / m.group(0)).is_file()})
    assert not missing, missing


def test_markdown_links_stay_inside_and_resolve():
    problems = []
    for name, text in _text_files():
        if not name.endswith(".md"):
            continue
        folder = (REPO_ROOT / name).parent
        for m in MD_LINK.finditer(text):
            target = m.group(1).split("#", 1)[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor, or a URL (https:, mailto:)
                continue
            path = (folder / target).resolve()
            if REPO_ROOT.resolve() not in (path, *path.parents):
                problems.append(f"{name}: {m.group(1)} leaves the repository")
            elif not path.exists():
                problems.append(f"{name}: {m.group(1)} does not exist")
    assert not problems, problems


def test_the_design_documents_are_there():
    for doc in ("docs/method.md", "docs/architecture.md", "docs/architecture.svg", "bench/README.md"):
        assert (REPO_ROOT / doc).is_file(), doc
    assert "](architecture.svg)" in (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
