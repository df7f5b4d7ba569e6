"""Data shipped inside the package: the embedded tiny Qwen3 model and the bundled GSM8K files.

``asset_path("tiny-qwen3-gsm")`` is the model directory, ``asset_path("gsm8k/train.jsonl")`` a
data file; both resolve inside the installed package, so a wheel runs from any directory.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(name: str) -> Path:
    """The path of the bundled asset ``name`` (a path relative to ``hacbo_jax/assets``).

    Raises:
      FileNotFoundError: naming ``name`` and the assets present when it does not exist.
    """
    path = ASSETS_DIR / name
    if not path.exists():
        present = sorted(p.name for p in ASSETS_DIR.iterdir() if not p.name.startswith("_"))
        raise FileNotFoundError(
            f"asset {name!r}: not found in {ASSETS_DIR}; bundled assets: {', '.join(present)}"
        )
    return path
