"""Write params.yaml from ./conf exactly as `dvc exp run` does (DVC's own Hydra composition).

``python -m aelab.compose [OVERRIDE ...] [--out FILE]``, e.g. ``python -m aelab.compose profile=smoke``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dvc.utils.hydra import compose_and_dump


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=conv pretrain.optim.lr=0.01")
    parser.add_argument("--out", default="params.yaml")
    args = parser.parse_args(argv)
    compose_and_dump(args.out, str(Path("conf").resolve()), None, "config", "", args.overrides)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
