"""Write a folder dataset (Flickr8k, a Karpathy JSON) as a precomputed-feature file, one text per image, the layout
the cross-modal hashing papers train on (MIRFlickr-25K, NUS-WIDE: image features + a bag of words per image).

    python -m scripts.feature_file --data-dir ../shared/data/flickr8k --text bow --out runs/flickr8k-bow.npz
    python -m scripts.feature_file --data-dir ../shared/data/flickr8k --text backbone --out runs/flickr8k-minilm.npz

Why: the seed papers train their text network from a bag of words (FedCAFE, PLFedCMH: BoW -> MLP -> bits), so their
text side is learned, while fedxmr's default text side is a frozen sentence encoder. The two files differ only in
`txt`, so a run on each (`data-dir` = the file, `backbone = "identity"`) is a controlled experiment on the text
encoder: frozen MiniLM vs a tower trained from words, as the papers' is.
- `img`: the backbone's image features, read from the feature cache (encoded once if missing, as any run does);
- `txt`: `bow`, the binary bag of the image's captions' words (lower case; the `--vocab` words found in the most
  train images, each in at least `--min-df` of them), or `backbone`, the mean of the backbone's caption features
  (L2-normalised);
- `labels`: the dataset's labels (Flickr8k: the DERIVED concepts); `train` / `dev` / `test`: the dataset's splits;
- `provenance` (the arguments) and, for `bow`, `vocab` (the words, in column order): which file a run read.
Flickr8k's DERIVED concepts are read off the same caption words (a concept needs one of its words in two of the five
captions), so the concept words are in the bag (with the defaults, words of 31 of the 32 concepts): a bag of words
states the labels more directly than MIRFlickr's tags, annotated apart from its labels, do.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

from common.backbones import Backbone, build_backbone
from common.config import RunConfig
from common.data.datasets import open_dataset
from common.data.split import RetrievalSplit
from common.features import resolve_cache_dir, split_features

Text = Literal["bow", "backbone"]
TEXTS: tuple[Text, ...] = get_args(Text)


def image_documents(split: RetrievalSplit) -> list[str]:
    """Each image's captions joined into one document, in item order."""
    docs: list[list[str]] = [[] for _ in split.images]
    for caption, item in zip(split.captions, split.caption_image):
        docs[int(item)].append(caption)
    return [" ".join(d) for d in docs]


def caption_mean(features: np.ndarray, split: RetrievalSplit) -> np.ndarray:
    """Per image, the L2-normalised mean of its captions' features."""
    sums = np.zeros((len(split.images), features.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(split.caption_image), features)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{split.name}: an image has no caption features")
    return (sums / norms).astype(np.float32)


def bag_of_words(splits: dict[str, RetrievalSplit], vocab: int,
                 min_df: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Binary bags of words per image, and the words of their columns; the vocabulary comes from train only (dev
    and test never shape it)."""
    vectorizer = CountVectorizer(lowercase=True, binary=True, max_features=vocab, min_df=min_df,
                                 token_pattern=r"(?u)\b[a-z][a-z]+\b", dtype=np.float32)
    vectorizer.fit(image_documents(splits["train"]))
    bags = {name: vectorizer.transform(image_documents(s)).toarray() for name, s in splits.items()}
    empty = {name: int((b.sum(1) == 0).sum()) for name, b in bags.items()}
    if any(empty.values()):
        raise ValueError(f"images with an empty bag of words per split: {empty}; lower --min-df or raise --vocab")
    return bags, vectorizer.get_feature_names_out().astype(str)


def build(data_dir: str | Path, text: Text, model: Backbone, cache_dir: Path, vocab: int = 2000,
          min_df: int = 5) -> dict[str, np.ndarray]:
    """The arrays of the feature file: img, txt, labels over train + dev + test, the three index arrays and where
    they came from."""
    if text not in TEXTS:
        raise ValueError(f"--text {text!r}: expected one of {TEXTS}")
    dataset = open_dataset(data_dir)
    splits = {name: dataset.load(name) for name in ("train", "dev", "test")}
    modalities = ("img",) if text == "bow" else ("img", "txt")
    feats = {name: split_features(s, model, cache_dir, modalities) for name, s in splits.items()}
    extra = {"provenance": np.array(f"text={text} backbone={model.name} vocab={vocab} min-df={min_df}")}
    if text == "bow":
        txt, extra["vocab"] = bag_of_words(splits, vocab, min_df)
    else:
        txt = {name: caption_mean(feats[name]["txt"], s) for name, s in splits.items()}
    order = ("train", "dev", "test")
    sizes = np.cumsum([0] + [len(splits[n].images) for n in order])
    out = {
        "img": np.concatenate([feats[n]["img"] for n in order]).astype(np.float32),
        "txt": np.concatenate([txt[n] for n in order]).astype(np.float32),
        "labels": np.concatenate([splits[n].labels for n in order]).astype(np.uint8),
    }
    out.update({n: np.arange(sizes[i], sizes[i + 1]) for i, n in enumerate(order)})
    return out | extra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--text", choices=TEXTS, required=True)
    parser.add_argument("--out", required=True, type=Path)
    default_backbone = RunConfig.model_fields["backbone"].default
    parser.add_argument("--backbone", default=default_backbone, help=f"default: {default_backbone}, the runs' own")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: the runs' cache)")
    parser.add_argument("--vocab", type=int, default=2000, help="bag-of-words size (the words in the most train images)")
    parser.add_argument("--min-df", type=int, default=5, help="a word must occur in this many train images")
    args = parser.parse_args(argv)
    arrays = build(args.data_dir, args.text, build_backbone(args.backbone), resolve_cache_dir(args.cache_dir),
                   args.vocab, args.min_df)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    print(f"{args.out}: img {arrays['img'].shape}, txt {arrays['txt'].shape}, labels {arrays['labels'].shape}, "
          f"train/dev/test {len(arrays['train'])}/{len(arrays['dev'])}/{len(arrays['test'])}")


if __name__ == "__main__":
    main()
