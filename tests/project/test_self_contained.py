"""A clone is the whole product: nothing in the repository reaches outside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTSIDE_REFERENCE = "../" + "shared"


def tracked_files() -> list[Path]:
    listing = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
    ).stdout
    return [REPO / name for name in listing.decode().split("\0") if name]


def test_no_tracked_file_refers_to_the_folder_beside_the_repository() -> None:
    offenders = []
    for path in tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if OUTSIDE_REFERENCE in text:
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_readme_links_point_at_files_in_the_repository() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = [part.split(")", 1)[0] for part in readme.split("](")[1:]]
    local = [t.split("#", 1)[0] for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "the README links to its own files"
    missing = [t for t in local if t and not (REPO / t).exists()]
    assert missing == []
