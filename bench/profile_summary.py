"""Where a process spent its samples: a py-spy raw profile (``py-spy record -f raw``) as two tables, the frames
with the most samples including what they call, and the frames with the most samples of their own.

    python bench/profile_summary.py PROFILE.txt [--top 30] [> PROFILE.md]

bench/trace.py --profile writes such profiles of the node's controller and HTTP fronts during each measured
point, and this summary beside each.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

ENTRY_SHARE = 0.9
"""Frames in at least this share of the samples are where every stack starts, not where time goes."""

def _function(frame: str) -> str:
    """``func (file.py:123)`` → ``func (file.py)``: a function's samples together, whatever line they were at."""
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def summarize(raw: Path, top: int = 30) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return f"# {raw.name}\n\nno samples\n"
    entry = {f for f, n in inclusive.items() if n >= ENTRY_SHARE * total}  # main(), the loop's run(): in all
    lines = [f"# {raw.name}", "", f"{total} samples (only when the process ran Python or waited in a call); "
             f"{len(entry)} entry frames in ≥ {ENTRY_SHARE:.0%} of them left out of the first table.", "",
             "| samples | share | frame (with what it calls) |", "|---:|---:|---|"]
    lines += [f"| {n} | {n / total:.1%} | `{f}` |"
              for f, n in [(f, n) for f, n in inclusive.most_common() if f not in entry][:top]]
    lines += ["", "| samples | share | frame (its own) |", "|---:|---:|---|"]
    lines += [f"| {n} | {n / total:.1%} | `{f}` |" for f, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    print(summarize(args.profile, args.top), end="")


if __name__ == "__main__":
    main()
