"""Search speed and two-stage recall, measured side by side in one run (issue 13).

1. SYNTHETIC (random codes and embeddings, labelled so): top-10 queries/s over 1M items for faiss binary flat
   (64-bit codes), a plain numpy XOR + popcount scan, exact float inner-product search over 256-d embeddings, and
   two-stage search (Hamming top-C, re-ranked by the 256-d embeddings) for several C; ratios to exact search.
2. REAL (a trained run's weights, Flickr8k): the test images as queries against all 40,455 captions of the dataset
   as gallery, and the test split both ways: R@1/5/10 and rsum of exact continuous, Hamming and two-stage search for
   C = 50/100/200/500, the overlap of two-stage's top 10 with exact search's, and the smallest C whose test rsum is
   >= 99 % of exact search's.

    python -m benchmarks.search_speed --run runs/<run dir> [--items 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import load_file

from common.backbones import build_backbone
from common.data.datasets import load_split
from common.features import resolve_cache_dir, split_features
from common.metrics import hamming_recalls, retrieval_recalls
from common.model import ModelConfig, XmrModel, load_numpy_state
from common.search import ExactIndex, HammingIndex, TwoStageIndex, numpy_hamming_topk, pack_codes, recall_of

CANDIDATES = (50, 100, 200, 500)


def _qps(fn, n_queries: int) -> float:
    start = time.perf_counter()
    fn()
    return n_queries / (time.perf_counter() - start)


def synthetic(items: int, queries: int, bits: int = 64, dim: int = 256, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    codes = np.where(rng.random((items, bits), dtype=np.float32) < 0.5, -1.0, 1.0).astype(np.float32)
    emb = rng.standard_normal((items, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q_codes, q_emb = codes[:queries].copy(), emb[:queries].copy()
    hamming, exact, two = HammingIndex(codes), ExactIndex(emb), TwoStageIndex(codes, emb)
    packed = pack_codes(codes)
    rows = {"faiss binary flat (Hamming)": _qps(lambda: hamming.search(q_codes, 10), queries),
            "numpy XOR + popcount scan": _qps(lambda: numpy_hamming_topk(pack_codes(q_codes[:20]), packed, 10), 20),
            f"exact float inner product ({dim}-d)": _qps(lambda: exact.search(q_emb, 10), queries)}
    for c in CANDIDATES:
        rows[f"two-stage, C = {c}"] = _qps(lambda: two.search(q_codes, q_emb, 10, c), queries)
    base = rows[f"exact float inner product ({dim}-d)"]
    print(f"\nSYNTHETIC (random {bits}-bit codes and {dim}-d unit vectors; not benchmark data): {items:,} items, "
          f"top-10, {queries} queries, faiss threads {faiss.omp_get_max_threads()}\n")
    print("| search | queries/s | × exact float |\n|---|---|---|")
    for name, qps in rows.items():
        print(f"| {name} | {qps:,.1f} | {qps / base:.1f} |")


def _model(run_dir: Path) -> tuple[XmrModel, dict]:
    config = json.loads((run_dir / "config.json").read_text())
    model = XmrModel(ModelConfig.from_dict(config["model"]))
    load_numpy_state(model, load_file(str(run_dir / "weights.safetensors")), partial=True)
    return model.eval(), config["run"]


def _rsum(i2t: dict, t2i: dict) -> float:
    return sum(i2t.values()) + sum(t2i.values())


def real(run_dir: Path, data_dir: str, cache_dir: str) -> None:
    model, run = _model(run_dir)
    backbone = build_backbone(run["backbone"], "cpu")
    cache = resolve_cache_dir(cache_dir or run["cache-dir"])
    splits = {s: load_split(data_dir or run["data-dir"], s) for s in ("train", "dev", "test")}
    feats = {s: split_features(splits[s], backbone, cache) for s in splits}
    enc = {s: {m: model.encode(m, feats[s][m]) for m in ("img", "txt")} for s in splits}
    test = splits["test"]
    (qi_emb, qi_code), (tt_emb, tt_code) = enc["test"]["img"], enc["test"]["txt"]
    own = [set(np.flatnonzero(test.caption_image == i)) for i in range(len(test.images))]
    ks = (1, 5, 10)

    # the test split, both directions (the evaluation's protocol)
    ref = retrieval_recalls(qi_emb @ tt_emb.T, test.caption_image)
    exact_rsum = ref["rsum"]
    rows = []
    i2t_two, t2i_two = TwoStageIndex(tt_code, tt_emb), TwoStageIndex(qi_code, qi_emb)
    for c in (*CANDIDATES, len(test.images)):
        i2t = recall_of(i2t_two.search(qi_code, qi_emb, 16, c), own, ks)
        t2i = recall_of(t2i_two.search(tt_code, tt_emb, 12, c), [{int(i)} for i in test.caption_image], ks)
        rows.append((c, _rsum(i2t, t2i)))
    ham = _rsum(recall_of(HammingIndex(tt_code).search(qi_code, 16), own, ks),
                recall_of(HammingIndex(qi_code).search(tt_code, 12), [{int(i)} for i in test.caption_image], ks))
    print(f"\nREAL: {run_dir.name} ({run['hash-bits']}-bit codes), Flickr8k test split (1,000 images, 5,000 captions)\n")
    evaluation = hamming_recalls(qi_code, tt_code, test.caption_image)["rsum"]  # the same number, another path
    print(f"| search | test rsum | % of exact |\n|---|---|---|\n| exact continuous | {exact_rsum:.1f} | 100 |\n"
          f"| Hamming only (faiss; the evaluation's `hamming_recalls`: {evaluation:.1f}) | {ham:.1f} | "
          f"{100 * ham / exact_rsum:.1f} |")
    for c, rsum in rows:
        print(f"| two-stage, C = {c} | {rsum:.1f} | {100 * rsum / exact_rsum:.1f} |")
    enough = [c for c, rsum in rows if rsum >= 0.99 * exact_rsum]
    print(f"\nsmallest C with >= 99 % of exact test rsum: {min(enough) if enough else 'none tried'}")

    # every caption of the dataset as the gallery, test images as queries
    g_emb = np.concatenate([enc[s]["txt"][0] for s in splits])
    g_code = np.concatenate([enc[s]["txt"][1] for s in splits])
    offset = len(enc["train"]["txt"][0]) + len(enc["dev"]["txt"][0])
    relevant = [{offset + j for j in r} for r in own]
    exact = ExactIndex(g_emb)
    exact_hits = exact.search(qi_emb, 16)
    two = TwoStageIndex(g_code, g_emb)
    n = len(qi_emb)
    print(f"\nREAL: test images ({n}) -> all {len(g_emb):,} captions of the train, dev and test splits; image -> text "
          f"R@K; top-10 overlap with exact\n")
    print("| search | R@1 | R@5 | R@10 | top-10 overlap with exact | queries/s |\n|---|---|---|---|---|---|")
    qps = _qps(lambda: exact.search(qi_emb, 16), n)
    r = recall_of(exact_hits, relevant, ks)
    print(f"| exact continuous | {r[1]:.1f} | {r[5]:.1f} | {r[10]:.1f} | 100 | {qps:,.0f} |")
    for c in (*CANDIDATES, 1000, 2000):
        hits = two.search(qi_code, qi_emb, 16, c)
        qps = _qps(lambda: two.search(qi_code, qi_emb, 16, c), n)
        overlap = np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(hits.ids, exact_hits.ids)])
        r = recall_of(hits, relevant, ks)
        print(f"| two-stage, C = {c} | {r[1]:.1f} | {r[5]:.1f} | {r[10]:.1f} | {100 * overlap:.1f} | {qps:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run dir (weights.safetensors)")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args()
    synthetic(args.items, args.queries)
    real(args.run.resolve(), args.data_dir, args.cache_dir)


if __name__ == "__main__":
    main()
