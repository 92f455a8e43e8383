"""Regenerate (or ``--check``) the recipe YAMLs in examples/configs from megatron_vp2o/recipes.

    python tools/recipe_yamls.py            # rewrite the files
    python tools/recipe_yamls.py --check    # exit 1 naming the stale files
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_vp2o.recipes.yamls import expected


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for path, text in expected().items():
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            Path(path).write_text(text)
    if stale:
        print(f"out of date (run python tools/recipe_yamls.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
