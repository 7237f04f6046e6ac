"""bench/decisions.py: the scheduler's outcomes through seeded random work, compared between two trees."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def compare(base: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "decisions.py"), "--base", str(base), "--steps", "600"],
                          capture_output=True, text=True, timeout=120)


def test_a_copy_of_the_tree_decides_alike_and_a_changed_constant_shows_where_it_first_differs(tmp_path):
    shutil.copytree(ROOT / "swapserve", tmp_path / "swapserve", ignore=shutil.ignore_patterns("__pycache__"))
    same = compare(tmp_path)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.startswith("identical: ") and " 0 dispatches" not in same.stdout
    assert " 0 refusals" not in same.stdout  # the cases refuse requests, and dispatch them

    core = tmp_path / "swapserve" / "scheduler" / "core.py"
    text = core.read_text()
    assert "\nFETCH_MAX_MS = 3.0\n" in text
    core.write_text(text.replace("\nFETCH_MAX_MS = 3.0\n", "\nFETCH_MAX_MS = 0.5\n"))  # fewer side fetches
    changed = compare(tmp_path)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert "differs\n  this tree: " in changed.stdout and "\n  base:      " in changed.stdout


def test_the_base_must_be_a_tree(tmp_path):
    out = compare(tmp_path)
    assert out.returncode == 2 and "--base must be a tree's root" in out.stderr
