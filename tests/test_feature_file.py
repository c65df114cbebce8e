"""Tests for scripts.feature_file: a folder dataset written as a feature file the precomputed reader takes back."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest

from common.backbones import Backbone
from common.data.datasets import open_dataset
from common.data.split import RetrievalSplit
from common.data.concepts import CONCEPTS
from scripts.feature_file import bag_of_words, build, caption_mean

DIM = 3


class _Encoder:
    """A deterministic feature per item: its text's length, its character sum, 1."""

    def encode(self, items: Sequence) -> np.ndarray:
        return np.asarray([[len(str(x)), sum(map(ord, str(x))) % 101, 1.0] for x in items], dtype=np.float32)


def _backbone() -> Backbone:
    return Backbone(name="fake", img_dim=DIM, txt_dim=DIM, img_key="fake-img@v1", txt_key="fake-txt@v1",
                    _image=_Encoder, _text=_Encoder)


def _concept_column(name: str) -> int:
    return list(CONCEPTS).index(name)


def _split(name: str, captions: list[list[str]]) -> RetrievalSplit:
    images = tuple(f"{name}{i}.jpg" for i in range(len(captions)))
    flat = [(i, c) for i, caps in enumerate(captions) for c in caps]
    return RetrievalSplit(name, Path("."), images, tuple(f"{images[i]}#{k}" for k, (i, _) in enumerate(flat)),
                          tuple(c for _, c in flat), np.array([i for i, _ in flat]),
                          np.zeros((len(images), 1), dtype=np.uint8))


def test_bag_of_words_is_binary_and_its_vocabulary_comes_from_train_only() -> None:
    """Guards against test words leaking into the vocabulary: a word seen only in dev/test gets no column."""
    splits = {"train": _split("train", [["a dog runs", "a dog"], ["a cat sits"]]),
              "dev": _split("dev", [["the dog and a zebra"]]),
              "test": _split("test", [["a cat", "a cat cat"]])}
    bags, words = bag_of_words(splits, vocab=100, min_df=1)
    assert list(words) == ["cat", "dog", "runs", "sits"]
    # vocabulary (sorted): cat, dog, runs, sits; the one-letter "a" is no token
    np.testing.assert_array_equal(bags["train"], [[0, 1, 1, 0], [1, 0, 0, 1]])
    np.testing.assert_array_equal(bags["dev"], [[0, 1, 0, 0]])  # "the", "and", "zebra" never seen in train
    np.testing.assert_array_equal(bags["test"], [[1, 0, 0, 0]])  # binary: "cat" three times is 1


def test_an_image_with_no_known_word_is_an_error_naming_the_split() -> None:
    splits = {"train": _split("train", [["dog runs"]]), "dev": _split("dev", [["zebra"]]),
              "test": _split("test", [["dog"]])}
    with pytest.raises(ValueError, match="'dev': 1"):
        bag_of_words(splits, vocab=100, min_df=1)


def test_caption_mean_is_the_normalised_mean_of_each_images_captions() -> None:
    split = _split("train", [["x", "y"], ["z"]])
    feats = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(caption_mean(feats, split), [[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("text", ["bow", "backbone"])
def test_written_file_reads_back_through_the_feature_file_reader(
        tmp_path: Path, make_fake_flickr8k: Callable[..., Path], text: str) -> None:
    """Guards the round trip: the written .npz is a valid feature file with the folder's splits, labels and
    features, one text per image, in item order."""
    # odd images: two captions name a dog (DERIVED concept "dog"); even images: a cat, which is no concept
    animal = {i: "dog" if i % 2 else "cat" for i in range(6)}
    caps = {f"im{i}.jpg": [f"a {animal[i]} runs", f"a {animal[i]} sits on the grass {i}"] for i in range(6)}
    root = make_fake_flickr8k(tmp_path / "f8k", caps, {"train": ["im0.jpg", "im1.jpg", "im2.jpg"],
                                                       "dev": ["im3.jpg"], "test": ["im4.jpg", "im5.jpg"]})
    arrays = build(root, text, _backbone(), tmp_path / "cache", vocab=50, min_df=1)
    out = tmp_path / f"f8k-{text}.npz"
    np.savez(out, **arrays)
    folder, file = open_dataset(root), open_dataset(out, cache_dir=tmp_path / "cache")
    assert str(arrays["provenance"]).startswith(f"text={text} backbone=fake")
    for split, names in (("train", [0, 1, 2]), ("dev", [3]), ("test", [4, 5])):
        want, got = folder.load(split), file.load(split)
        np.testing.assert_array_equal(got.labels, want.labels)
        dog = got.labels[:, _concept_column("dog")]
        np.testing.assert_array_equal(dog, [i % 2 for i in names])  # the labels are real, and in item order
        np.testing.assert_array_equal(got.features["img"], _Encoder().encode(want.image_paths()))
        if text == "backbone":
            np.testing.assert_allclose(got.features["txt"], caption_mean(_Encoder().encode(want.captions), want),
                                       rtol=1e-6)
        else:
            words = list(arrays["vocab"])
            np.testing.assert_array_equal(got.features["txt"][:, words.index("dog")], [i % 2 for i in names])
            np.testing.assert_array_equal(got.features["txt"][:, words.index("cat")], [1 - i % 2 for i in names])
