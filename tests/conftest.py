"""Shared test fixtures."""
import os
from pathlib import Path

import pytest

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k"


@pytest.fixture(scope="session")
def flickr8k_root() -> Path:
    """The real Flickr8k folder (../shared/flickr8k); missing: fail under CI, else skip."""
    if not (FLICKR8K / "text" / "Flickr8k.token.txt").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{FLICKR8K}: Flickr8k data missing (required when CI is set)")
        pytest.skip(f"{FLICKR8K}: Flickr8k data missing")
    return FLICKR8K


def _first_images(root: Path, split_file: str, n: int) -> list[str]:
    names = (root / "text" / split_file).read_text().split()
    return [x for x in names if (root / "images" / x).is_file()][:n]


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, flickr8k_root) -> Path:
    """A prepared dataset of 12 train + 4 dev real Flickr8k photos with a real lite2 feature store."""
    from captioner.data.datasets import prepare
    from captioner.features.store import build_features

    folder = tmp_path_factory.mktemp("tiny")
    train = _first_images(flickr8k_root, "Flickr_8k.trainImages.txt", 12)
    dev = _first_images(flickr8k_root, "Flickr_8k.devImages.txt", 4)
    wanted = {**{x: "train" for x in train}, **{x: "dev" for x in dev}}
    lines = ["image,caption,split"]
    for line in (flickr8k_root / "text" / "Flickr8k.token.txt").read_text().splitlines():
        name, caption = line.split("\t")
        name = name.split("#")[0]
        if name in wanted:
            lines.append(f'{flickr8k_root / "images" / name},"{caption.replace(chr(34), "")}",{wanted[name]}')
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    work = folder / "work"
    prepare(folder / "captions.csv", work, min_count=1, progress=False)
    build_features(work, encoder="lite2", backend="torch", progress=False)
    return work


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The shipped model, or the checkpoint named by env CAPTIONER_TEST_MODEL; missing: fail under CI, else skip."""
    from captioner.checkpoint import default_model_path
    path = Path(os.environ.get("CAPTIONER_TEST_MODEL") or default_model_path())
    if not path.exists():  # a checkpoint file, or a model folder (pretrained.py)
        if os.environ.get("CI"):
            pytest.fail(f"{path}: model missing (required when CI is set)")
        pytest.skip(f"{path}: model missing")
    return path
