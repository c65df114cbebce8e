"""Partitioners: which items of a pool each client holds. Seeded and deterministic (every node recomputes the
same split), and each one covers every item exactly once.

- `iid`: a seeded shuffle cut into near-equal parts.
- `dirichlet` (β): per class, client shares ~ Dir(β) (smaller β = more skew), as in NIID-Bench. Flickr8k has no
  classes, so the class of an image is its *dominant DERIVED concept*: the rarest concept among its labels (the
  most specific one); images without any label form one extra class.
- `nway`: each client holds `ways` classes (pathological non-IID); every class goes to at least one client and is
  split equally among the clients holding it. With `shots` > 0 (n-way k-shot, FedProto's and PLFedCMH's protocol)
  each client keeps a seeded random `shots` of its items of each class it holds, and the rest of the pool is unused.
- `quantity`: IID content, client sizes ~ Dir(β) (quantity skew).
All but `iid` keep at least `min_size` items per client (redrawn up to 100 times, else an error). All cover every
item exactly once, except n-way k-shot.

`follow_partition` splits a second pool (the test pool) so that each client's share of every class matches its
share of that class in the first (train) pool: a client's local test shard has its train shard's class mix.

`python -m common.data.partition --partitioner dirichlet --beta 0.1 --num-partitions 10` prints a summary
(`__main__.py`: the command loads a dataset, the partitioners only take label arrays).
"""

from __future__ import annotations

import numpy as np

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "nway", "quantity")
_MAX_TRIES = 100


def iid_partition(num_items: int, num_partitions: int, partition_id: int, seed: int) -> np.ndarray:
    """Indices of partition `partition_id` of an IID split."""
    return partition("iid", num_items, num_partitions, seed)[_check_id(partition_id, num_partitions)]


def _check_id(partition_id: int, num_partitions: int) -> int:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions - 1}], got {partition_id}")
    return partition_id


def dominant_class(labels: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Class id per item: its rarest present label (ties: lowest index); items with no label get class n_labels.
    Rarity is counted in `reference` (default: `labels` itself), so that another pool's items (dev, test) get the
    classes the train partition was drawn with."""
    labels = np.asarray(labels, dtype=bool)
    counts = np.asarray(labels if reference is None else reference, dtype=bool).sum(axis=0).astype(np.float64)
    rarity = np.where(labels, counts[None, :], np.inf)
    cls = rarity.argmin(axis=1)
    cls[~labels.any(axis=1)] = labels.shape[1]
    return cls


def _by_class(classes: np.ndarray, shares_per_class, rng: np.random.Generator, k: int) -> list[np.ndarray]:
    parts: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(classes):
        idx = rng.permutation(np.flatnonzero(classes == c))
        cuts = (np.cumsum(shares_per_class(c)) * len(idx)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def k_shot(parts: list[np.ndarray], classes: np.ndarray, shots: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each part keeps at most `shots` random items of each of its classes."""
    out = []
    for part in parts:
        keep = [rng.permutation(part[classes[part] == c])[:shots] for c in np.unique(classes[part])]
        out.append(np.sort(np.concatenate(keep)) if keep else part)
    return out


def partition(name: str, num_items: int, num_partitions: int, seed: int, labels: np.ndarray | None = None,
              beta: float = 0.5, ways: int = 2, min_size: int = 2, shots: int = 0) -> list[np.ndarray]:
    """All partitions (sorted index arrays) of `num_items` items; `labels` (n, n_labels) for label-based ones;
    `shots` > 0: n-way k-shot (`nway` only)."""
    if shots and name != "nway":
        raise ValueError(f"partition shots (k-shot sub-sampling) apply to the nway partitioner only, not {name!r}")
    if shots < 0:
        raise ValueError(f"partition shots must be >= 0, got {shots}")
    parts = _partition(name, num_items, num_partitions, seed, labels, beta, ways, min_size)
    if shots:
        parts = k_shot(parts, dominant_class(labels), shots, np.random.default_rng([seed, 7919]))
    return parts


def _partition(name: str, num_items: int, num_partitions: int, seed: int, labels: np.ndarray | None,
               beta: float, ways: int, min_size: int) -> list[np.ndarray]:
    k = num_partitions
    if k < 1:
        raise ValueError(f"num-partitions must be >= 1, got {k}")
    need = 1 if name == "iid" else max(min_size, 1)
    if num_items < k * need:
        raise ValueError(f"cannot split {num_items} items into {k} partitions of at least {need} items")
    rng = np.random.default_rng(seed)
    if name == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(num_items), k)]
    if name not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {name!r}; expected one of {PARTITIONERS}")
    if name in ("dirichlet", "quantity") and not beta > 0:
        raise ValueError(f"partition beta must be > 0, got {beta}")
    if name in ("dirichlet", "nway"):
        if labels is None or len(labels) != num_items:
            raise ValueError(f"partitioner {name!r} needs one label row per item")
        classes = dominant_class(labels)
    for _ in range(_MAX_TRIES):
        if name == "quantity":
            sizes = np.maximum((rng.dirichlet(np.full(k, beta)) * num_items).astype(int), 0)
            sizes[-1] = num_items - sizes[:-1].sum()
            parts = [np.sort(p) for p in np.split(rng.permutation(num_items), np.cumsum(sizes)[:-1])]
        elif name == "dirichlet":
            shares = {c: rng.dirichlet(np.full(k, beta)) for c in np.unique(classes)}
            parts = _by_class(classes, shares.__getitem__, rng, k)
        else:
            parts = _by_class(classes, _nway_shares(np.unique(classes), k, ways, rng), rng, k)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(f"partitioner {name!r} could not give every one of {k} clients >= {min_size} items "
                     f"in {_MAX_TRIES} draws; raise beta/ways or lower num-partitions")


def _nway_shares(class_ids: np.ndarray, k: int, ways: int, rng: np.random.Generator):
    """Client shares per class: `ways` classes per client, cycling over a shuffled class list so all are held."""
    if ways < 1:
        raise ValueError(f"partition ways must be >= 1, got {ways}")
    order = rng.permutation(class_ids)
    holders: dict[int, list[int]] = {int(c): [] for c in class_ids}
    for client in range(k):
        for j in range(ways):
            holders[int(order[(client * ways + j) % len(order)])].append(client)
    for who in holders.values():  # more classes than k*ways: give the rest to random clients
        if not who:
            who.append(int(rng.integers(k)))

    def shares(c: int) -> np.ndarray:
        s = np.zeros(k)
        for client in holders[int(c)]:
            s[client] += 1.0
        return s / s.sum()

    return shares


def follow_partition(ref_classes: np.ndarray, ref_parts: list[np.ndarray], classes: np.ndarray,
                     seed: int) -> list[np.ndarray]:
    """Split items with `classes` like `ref_parts` split the reference items: the items of class c go to clients in
    proportion to their reference count of c (classes absent from the reference: in proportion to client sizes).
    Every item is assigned exactly once; a client may get none."""
    k = len(ref_parts)
    n_cls = int(max(ref_classes.max(initial=0), classes.max(initial=0))) + 1
    counts = np.stack([np.bincount(ref_classes[p], minlength=n_cls) for p in ref_parts]).astype(np.float64)
    sizes = counts.sum(axis=1)
    rng = np.random.default_rng([seed, 104729])

    def shares(c: int) -> np.ndarray:
        w = counts[:, c] if counts[:, c].sum() > 0 else sizes
        return w / w.sum()

    return _by_class(classes, shares, rng, k)
