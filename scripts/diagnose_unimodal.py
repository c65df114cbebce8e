"""Why do unimodal clients' updates hurt FedAvg? Measured inside every round of an in-process FedAvg run (issue 11).

  python -m scripts.diagnose_unimodal --seed 0 --rounds 8 --out runs/diagnose-fedavg-seed0.json
  python -m scripts.diagnose_unimodal --seed 0 --rounds 8 --out runs/diagnose-unialign-seed0.json \
      --set method=unialign unialign-distill-weight=1        # the same, on unialign's trajectory
  python -m scripts.diagnose_unimodal --summary runs/diagnose-fedavg-seed*.json   # the table in docs/MEASURED.md

Per round, from the same global model and the same client updates:
- per unimodal client (modality m), on the paired dev items (diagnosis only: dev is never trained on):
  - `drift`: rsum of the global model with only its tower m replaced by the client's, minus the global rsum (the
    other tower stays global: what its update does to cross-modal alignment); `pair-cos`: the change of the mean
    cosine between matched dev image/caption embeddings; the same for the paired clients' mean update of tower m;
  - `cos-to-paired`: cosine between its update of tower m and the paired clients' weighted mean update, overall
    and per parameter group (norm, proj, adapter, hash); `norm-ratio`: the norm of its update over that mean's;
  - what its objective teaches: `c2c-r1` (caption -> another caption of the same scene, R@1, dev; text tower) and
    `uniformity` (Wang & Isola, log E exp(-2|x-y|^2) over dev embeddings of its modality), global vs updated;
- aggregates (dev rsum / hash rsum): FedAvg, paired-only, `dilution` (unimodal clients counted with a zero update,
  i.e. their weight only), and `uni-<group>` (unimodal clients contribute only that parameter group).
The run continues from the FedAvg aggregate, as a Flower FedAvg run would.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from scripts.inproc import Arrays, Federation, Update, weighted_mean

GROUPS = ("norm", "proj", "adapter", "hash")


def group_of(key: str) -> str:
    """'img.adapter.up.weight' -> 'adapter'; the temperature ('logit_scale') -> 'temperature'."""
    parts = key.split(".")
    return parts[1] if len(parts) > 2 else "temperature"


def _flat(arrays: Arrays, keys: list[str]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel().astype(np.float64) for k in keys]) if keys else np.zeros(0)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _delta(update: Update, g: Arrays) -> Arrays:
    return {k: v - g[k] for k, v in update.arrays.items()}


def _uniformity(emb: np.ndarray, rng: np.random.Generator, n: int = 2000) -> float:
    x = emb[rng.choice(len(emb), size=min(n, len(emb)), replace=False)]
    d2 = np.clip(2 - 2 * x @ x.T, 0, None)[np.triu_indices(len(x), 1)]
    return float(np.log(np.mean(np.exp(-2 * d2))))


def _c2c_r1(txt: np.ndarray, caption_image: np.ndarray) -> float:
    """Caption -> the nearest other caption is of the same scene (R@1, %)."""
    sim = txt @ txt.T
    np.fill_diagonal(sim, -np.inf)
    return float(100 * np.mean(caption_image[sim.argmax(1)] == caption_image))


def _pair_cos(fed: Federation, arrays: Arrays) -> float:
    model = fed.model(arrays)
    ie, te = (model.encode(m, fed.dev_feats[m])[0] for m in ("img", "txt"))
    return float(np.mean(np.sum(ie[fed.dev.caption_image] * te, axis=1)))


def _objective_effect(fed: Federation, mod: str, g: Arrays, new: Arrays, rng: np.random.Generator) -> dict:
    out = {}
    for name, arrays in (("global", g), ("updated", new)):
        emb = fed.model(arrays).encode(mod, fed.dev_feats[mod])[0]
        out[f"uniformity-{name}"] = _uniformity(emb, rng)
        if mod == "txt":
            out[f"c2c-r1-{name}"] = _c2c_r1(emb, fed.dev.caption_image)
    return out


def study_round(fed: Federation, g: Arrays, server_round: int) -> tuple[dict, Arrays]:
    updates = [fed.local_update(k, g, server_round) for k in range(len(fed.shards))]
    paired = [u for u in updates if u.client_type == "paired"]
    uni = [u for u in updates if u.client_type != "paired"]
    base = fed.dev_scores(g)
    out: dict = {"round": server_round, "global-rsum": base["rsum"], "global-pair-cos": _pair_cos(fed, g),
                 "clients": []}
    paired_mean = {k: v - g[k] for k, v in weighted_mean(g, paired).items()}
    for mod in ("img", "txt"):  # the paired mean update applied to one tower: the reference drift
        keys = [k for k in g if k.startswith(f"{mod}.")]
        swapped = g | {k: g[k] + paired_mean[k] for k in keys}
        out[f"paired-mean-{mod}"] = {"drift": fed.dev_scores(swapped)["rsum"] - base["rsum"],
                                     "pair-cos": _pair_cos(fed, swapped) - out["global-pair-cos"]}
    rng = np.random.default_rng(server_round)
    for u in uni:
        mod = next(iter(u.arrays)).split(".", 1)[0]
        keys = sorted(u.arrays)
        delta = _delta(u, g)
        swapped = g | u.arrays
        row = {"partition-id": u.partition_id, "type": u.client_type, "weight": u.weight,
               "drift": fed.dev_scores(swapped)["rsum"] - base["rsum"],
               "pair-cos": _pair_cos(fed, swapped) - out["global-pair-cos"],
               "cos-to-paired": _cos(_flat(delta, keys), _flat(paired_mean, keys)),
               "norm-ratio": float(np.linalg.norm(_flat(delta, keys)) / np.linalg.norm(_flat(paired_mean, keys)))}
        for grp in GROUPS:
            gk = [k for k in keys if group_of(k) == grp]
            row[f"cos-to-paired-{grp}"] = _cos(_flat(delta, gk), _flat(paired_mean, gk))
        row |= _objective_effect(fed, mod, g, swapped, rng)
        out["clients"].append(row)
    is_uni = {u.partition_id: u.client_type != "paired" for u in updates}
    aggregates = {
        "fedavg": weighted_mean(g, updates),
        "paired-only": weighted_mean(g, paired),
        "dilution": weighted_mean(g, paired + [Update(u.partition_id, u.client_type, {k: g[k] for k in u.arrays},
                                                      u.weight) for u in uni]),
    }
    for grp in GROUPS:
        aggregates[f"uni-{grp}"] = weighted_mean(
            g, updates, lambda u, key, grp=grp: 0.0 if is_uni[u.partition_id] and group_of(key) != grp else u.weight)
    out["aggregates"] = {}
    for name, arrays in aggregates.items():
        s = fed.dev_scores(arrays, hashing=True)
        out["aggregates"][name] = {"rsum": s["rsum"], "hash_rsum": s["hash_rsum"]}
    return out, aggregates["fedavg"]


def summary(paths: list[Path]) -> str:
    """A markdown table of the study files (one per seed): per client type, the mean over clients, rounds 2 and up
    (round 1 starts from a random model) and seeds; then the aggregates' dev rsum, mean over the same rounds."""
    rows = [r for p in paths for r in json.loads(p.read_text()) if r["round"] >= 2]
    keys = ["drift", "pair-cos", "cos-to-paired", *(f"cos-to-paired-{g}" for g in GROUPS), "norm-ratio",
            "uniformity-global", "uniformity-updated", "c2c-r1-global", "c2c-r1-updated"]
    lines = [f"{len(paths)} seed(s), rounds 2-{max(r['round'] for r in rows)}, mean over rounds, seeds and clients:",
             "", "| client type | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for kind in ("image-only", "text-only"):
        cells = []
        for key in keys:
            vals = [c[key] for r in rows for c in r["clients"] if c["type"] == kind and key in c]
            cells.append(f"{np.nanmean(vals):.3f}" if vals else "–")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    for mod in ("img", "txt"):
        ref = [r[f"paired-mean-{mod}"] for r in rows]
        lines.append(f"| paired mean update, {mod} tower | {np.mean([x['drift'] for x in ref]):.3f} | "
                     f"{np.mean([x['pair-cos'] for x in ref]):.3f} |" + " – |" * (len(keys) - 2))
    names = list(rows[0]["aggregates"])
    lines += ["", "| aggregate | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in ("rsum", "hash_rsum"):
        lines.append(f"| dev {metric} | " + " | ".join(
            f"{np.mean([r['aggregates'][n][metric] for r in rows]):.1f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--summary"]:
        print(summary([Path(p) for p in sys.argv[2:]]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--data-dir", default="../shared/data/flickr8k")
    ap.add_argument("--cache-dir", default=".cache/features")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="run-config overrides, e.g. method=unialign (clients train by that method; the run still "
                         "aggregates by size, as FedAvg)")
    args = ap.parse_args()
    overrides = dict(pair.split("=", 1) for pair in args.set)
    fed = Federation({"method": "fedavg", "partitioner": "dirichlet", "partition-beta": 0.1,
                      "modality-mix": "0.5,0.25,0.25", "seed": args.seed, "data-dir": args.data_dir,
                      "cache-dir": args.cache_dir} | overrides)
    g, rows = fed.initial, []
    for r in range(1, args.rounds + 1):
        start = time.perf_counter()
        row, g = study_round(fed, g, r)
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
        agg = {k: round(v["rsum"], 1) for k, v in row["aggregates"].items()}
        print(f"round {r} ({time.perf_counter() - start:.0f} s): global {row['global-rsum']:.1f} {agg}", flush=True)
        for c in row["clients"]:
            print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items()}, flush=True)


if __name__ == "__main__":
    main()
