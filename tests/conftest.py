"""Shared fixtures: the real Flickr8k folder (required, never skipped) and a tiny fake dataset folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

DATA_DIR_ENV = "FEDXMR_DATA_DIR"
_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data/flickr8k"


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    """The real Flickr8k folder: $FEDXMR_DATA_DIR, else <repo root>/../shared/data/flickr8k. Missing -> FAIL."""
    raw = os.environ.get(DATA_DIR_ENV, "")
    root = Path(raw).expanduser().resolve() if raw else _DEFAULT_DATA_DIR
    if not (root / "Flickr8k.token.txt").is_file() or not (root / "images").is_dir():
        pytest.fail(
            f"Flickr8k dataset not found at {root} (needs Flickr8k.token.txt and images/). Set ${DATA_DIR_ENV} "
            f"or provide {_DEFAULT_DATA_DIR}; these tests require the real data and are never skipped.",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def flickr8k_images(flickr8k_dir: Path) -> list[Path]:
    """Two real Flickr8k images (first two test-split entries)."""
    names = (flickr8k_dir / "Flickr_8k.testImages.txt").read_text(encoding="utf-8").split()[:2]
    paths = [flickr8k_dir / "images" / n for n in names]
    assert len(paths) == 2 and all(p.is_file() for p in paths), paths
    return paths


def _write_fake_flickr8k(root: Path, captions: dict[str, list[str]], splits: dict[str, list[str]],
                        token_lines: list[str] | None = None) -> Path:
    """A minimal Flickr8k-layout folder: tiny JPEGs, a token file and the three split files."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in captions:
        Image.new("RGB", (8, 8), (len(name) * 20 % 256, 80, 160)).save(root / "images" / name, "JPEG")
    if token_lines is None:
        token_lines = [f"{img}#{k}\t{cap}" for img, caps in captions.items() for k, cap in enumerate(caps)]
    (root / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n", encoding="utf-8")
    for split in ("train", "dev", "test"):
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(splits.get(split, [])) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def make_fake_flickr8k() -> Callable[..., Path]:
    """Factory fixture: make_fake_flickr8k(root, captions, splits, token_lines=None) -> root."""
    return _write_fake_flickr8k
