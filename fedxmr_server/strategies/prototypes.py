"""Global prototype tables kept in a strategy's state buffers, shared by the methods that exchange prototypes
(RCSR, FedProto): reading a client's tables from its reply, fusing them into the global ones, sending them out."""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from common import protocol as P
from common.prototypes import MODS, fuse_prototypes
from common.trust import bounded_counts, cap_columns, clip_rows
from fedxmr_server.strategies.base import from_array_record, to_array_record

Tables = dict[str, tuple[np.ndarray, np.ndarray]]  # modality -> (table (1 + C, d), counts (1 + C,))


def global_prototypes(buffers: dict[str, np.ndarray]) -> Tables:
    """The global tables that have at least one non-empty row."""
    return {m: (buffers[f"proto/{m}"], buffers[f"proto/{m}-count"]) for m in MODS
            if f"proto/{m}" in buffers and buffers[f"proto/{m}-count"].max() > 0}


def prototype_record(tables: Tables) -> ArrayRecord:
    return to_array_record({k: v for m, (t, c) in tables.items() for k, v in ((m, t), (f"{m}-count", c))})


def client_prototypes(msg: Message, dim: int, rows: int | None,
                      size: float | None = None) -> tuple[Tables, str | None]:
    """The reply's prototype tables for the modalities it holds, or a reason why they are unusable: each must be
    (rows, dim) (`rows`: the global tables', once they exist) with finite values and non-negative counts. With the
    client's `size`, the tables as the server uses them: rows (means of unit embeddings) cut to norm <= 1, counts to
    the items that size allows (`common.trust.bounded_counts`)."""
    if P.PROTOTYPES not in msg.content.array_records:
        return {}, f"no {P.PROTOTYPES!r} record"
    rec = from_array_record(msg.content[P.PROTOTYPES])
    metrics = msg.content[P.METRICS]
    out = {}
    for m in MODS:
        if not metrics.get(P.HAS[m], 1):
            continue
        table, counts = rec.get(m), rec.get(f"{m}-count")
        if table is None or counts is None or table.ndim != 2 or counts.shape != (table.shape[0],):
            return {}, f"prototypes of {m!r} missing or mis-shaped"
        if table.shape[1] != dim or (rows is not None and table.shape[0] != rows):
            return {}, f"prototypes of {m!r} have shape {table.shape}, expected ({rows or 'any'}, {dim})"
        if not (np.all(np.isfinite(table)) and np.all(np.isfinite(counts))) or np.any(counts < 0):
            return {}, f"prototypes of {m!r} are not finite or have negative counts"
        out[m] = (table, counts) if size is None else (clip_rows(table), bounded_counts(counts, size, m))
    return out, None


def table_rows(buffers: dict[str, np.ndarray]) -> int | None:
    """Rows of the global tables (None before the first fusion): every client's tables must have as many."""
    tables = [buffers[f"proto/{m}"] for m in MODS if f"proto/{m}" in buffers]
    return tables[0].shape[0] if tables else None


def fuse_into(buffers: dict[str, np.ndarray], protos: list[Tables], weights: np.ndarray, ema: float,
              max_share: float) -> np.ndarray:
    """Fuse the clients' tables (client weight x row counts, no client above `max_share` of a row) into the global
    tables in `buffers`, once. Returns each client's largest share of a row that enough clients fed for the cap to
    bind (>= 1 / max_share of them; a row fed by fewer is capped at the uniform share); 0 where none."""
    shares = np.zeros(len(protos))
    for m in MODS:
        held = [(p[m], w, i) for i, (p, w) in enumerate(zip(protos, weights)) if m in p and w > 0]
        if not held:
            continue
        shape = held[0][0][0].shape
        if any(t.shape != shape for (t, _), _, _ in held):  # only possible before the first fusion fixed the rows
            log(WARNING, "clients sent %r prototype tables of different shapes; fusing those shaped %s", m, shape)
            held = [((t, c), w, i) for (t, c), w, i in held if t.shape == shape]
        table = buffers.get(f"proto/{m}", np.zeros(shape, np.float32))
        counts = buffers.get(f"proto/{m}-count", np.zeros(shape[0], np.float32))
        if table.shape != shape:
            log(WARNING, "prototype tables of %r changed shape %s -> %s; restarting them", m, table.shape, shape)
            table, counts = np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)
        tables, row_counts = [t for (t, _), _, _ in held], [c for (_, c), _, _ in held]
        w = np.array([w for _, w, _ in held])
        table, counts = fuse_prototypes(table, counts, tables, row_counts, w, ema, max_share)
        buffers[f"proto/{m}"], buffers[f"proto/{m}-count"] = table, counts
        mass = cap_columns(w[:, None] * np.stack(row_counts), max_share)
        binding = (mass > 0).sum(axis=0) * max_share >= 1 - 1e-9  # rows where the cap, not the uniform share, holds
        row_share = (mass / np.maximum(mass.sum(axis=0), 1e-300))[:, binding].max(axis=1, initial=0.0)
        holders = [i for _, _, i in held]
        shares[holders] = np.maximum(shares[holders], row_share)
    return shares
