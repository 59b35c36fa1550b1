"""The share of code blocks (functions, methods, classes) whose cyclomatic complexity is rated B or worse
by radon (complexity above 5), over every package's sources; with --list, those blocks, worst first.

radon is not a dependency of any package; uv lends it for the run:

    uv run --with radon python tools/complexity.py [--list]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from radon.complexity import cc_rank, cc_visit

ROOT = Path(__file__).resolve().parent.parent
WORST_A = 5  # radon's grade A ends at complexity 5


def blocks(root: Path) -> list[tuple[int, str]]:
    """(complexity, "file:line name") of every block radon rates in packages/*/src."""
    found = []
    for path in sorted(root.glob("packages/*/src/**/*.py")):
        for block in cc_visit(path.read_text()):
            found.append((block.complexity, f"{path.relative_to(root)}:{block.lineno} {block.fullname}"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the blocks rated B or worse, worst first")
    args = parser.parse_args()
    rated = blocks(ROOT)
    complex_blocks = sorted((b for b in rated if b[0] > WORST_A), reverse=True)
    if args.list:
        for complexity, where in complex_blocks:
            print(f"{cc_rank(complexity)} {complexity:3d}  {where}")
    share = len(complex_blocks) / max(1, len(rated))
    print(f"{len(complex_blocks)} of {len(rated)} blocks rated B or worse ({share:.1%})")


if __name__ == "__main__":
    main()
