"""DERIVED concept labels for Flickr8k (Flickr8k has no official labels).

A fixed vocabulary of 32 visual concepts, each a set of caption words. An image carries a concept when at
least `MIN_CAPTIONS` (2) of its 5 captions mention one of the concept's words (whole-word, lower-case match);
requiring two captions filters one-off mentions. Captions inherit the labels of their image. These labels feed
label-based hashing metrics (MAP with "shares at least one label" relevance) and label-based partitions; they are
*derived from captions*, not ground truth, and every report that uses them says so.

`python -m common.data.concepts --data-dir DIR` prints the label counts per split (`__main__.py`: the command
loads datasets, which label with this module, so it lives apart from it).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

MIN_CAPTIONS = 2

CONCEPTS: dict[str, frozenset[str]] = {
    name: frozenset(words.split())
    for name, words in {
        "dog": "dog dogs puppy puppies",
        "horse": "horse horses pony",
        "bird": "bird birds",
        "man": "man men guy guys gentleman",
        "woman": "woman women lady ladies",
        "boy": "boy boys",
        "girl": "girl girls",
        "child": "child children kid kids toddler baby",
        "group": "group crowd team audience",
        "water": "water pool lake river ocean sea wave waves splash splashes splashing stream fountain",
        "beach": "beach sand sandy shore",
        "snow": "snow snowy ski skier skiing snowboard snowboarder snowboarding",
        "grass": "grass grassy lawn field yard",
        "mountain": "mountain mountains hill hills cliff rock rocks rocky",
        "street": "street road sidewalk city crosswalk building buildings",
        "trees": "tree trees woods forest",
        "bike": "bike bikes bicycle bicycles cyclist biker bmx",
        "ball": "ball balls",
        "sport": "soccer football basketball baseball tennis rugby hockey volleyball",
        "skateboard": "skateboard skateboarder skateboarding skater skate",
        "vehicle": "car cars truck vehicle motorcycle motorbike",
        "swim": "swim swims swimming swimmer",
        "jump": "jump jumps jumping leap leaps leaping midair",
        "run": "run runs running race racing chasing chases",
        "climb": "climb climbs climbing climber",
        "sit": "sit sits sitting seated bench",
        "ride": "ride rides riding rider",
        "headwear": "hat hats helmet helmets cap",
        "red": "red",
        "blue": "blue",
        "black": "black",
        "white": "white",
    }.items()
}
CONCEPT_NAMES: tuple[str, ...] = tuple(CONCEPTS)
_WORD = re.compile(r"[a-z]+")
_WORD_CONCEPTS: dict[str, tuple[int, ...]] = {  # word -> indices of the concepts it names
    w: tuple(i for i, c in enumerate(CONCEPT_NAMES) if w in CONCEPTS[c]) for w in set().union(*CONCEPTS.values())
}


def _concept_ids(caption: str) -> set[int]:
    return {i for w in set(_WORD.findall(caption.lower())) for i in _WORD_CONCEPTS.get(w, ())}


def caption_concepts(caption: str) -> np.ndarray:
    """Multi-hot (n_concepts,) of the concepts one caption mentions."""
    out = np.zeros(len(CONCEPT_NAMES), dtype=np.uint8)
    out[list(_concept_ids(caption))] = 1
    return out


def image_labels(captions_per_image: Sequence[Sequence[str]]) -> np.ndarray:
    """Derived multi-hot labels (n_images, n_concepts): concepts named by >= MIN_CAPTIONS captions.

    Counted through a word -> concept map: every ClientApp message of a simulated node labels the whole train
    split (the partition is drawn from it), so this is on the per-message path."""
    out = np.zeros((len(captions_per_image), len(CONCEPT_NAMES)), dtype=np.uint8)
    for i, caps in enumerate(captions_per_image):
        votes = Counter(j for c in caps for j in _concept_ids(c))
        out[i, [j for j, n in votes.items() if n >= MIN_CAPTIONS]] = 1
    return out
