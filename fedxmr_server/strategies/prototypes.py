"""Global prototype tables kept in a strategy's state buffers, shared by the methods that exchange prototypes
(RCSR, FedProto): reading a client's tables from its reply, fusing them into the global ones, sending them out."""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from common import protocol as P
from common.prototypes import MODS, fuse_prototypes
from fedxmr_server.strategies.base import from_array_record, to_array_record

Tables = dict[str, tuple[np.ndarray, np.ndarray]]  # modality -> (table (1 + C, d), counts (1 + C,))


def global_prototypes(buffers: dict[str, np.ndarray]) -> Tables:
    """The global tables that have at least one non-empty row."""
    return {m: (buffers[f"proto/{m}"], buffers[f"proto/{m}-count"]) for m in MODS
            if f"proto/{m}" in buffers and buffers[f"proto/{m}-count"].max() > 0}


def prototype_record(tables: Tables) -> ArrayRecord:
    return to_array_record({k: v for m, (t, c) in tables.items() for k, v in ((m, t), (f"{m}-count", c))})


def client_prototypes(msg: Message, dim: int, rows: int | None) -> tuple[Tables, str | None]:
    """The reply's prototype tables for the modalities it holds, or a reason why they are unusable: each must be
    (rows, dim) (`rows`: the global tables', once they exist) with finite values and non-negative counts."""
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
        out[m] = (table, counts)
    return out, None


def table_rows(buffers: dict[str, np.ndarray]) -> int | None:
    """Rows of the global tables (None before the first fusion): every client's tables must have as many."""
    tables = [buffers[f"proto/{m}"] for m in MODS if f"proto/{m}" in buffers]
    return tables[0].shape[0] if tables else None


def fuse_into(buffers: dict[str, np.ndarray], protos: list[Tables], weights: np.ndarray, ema: float) -> None:
    """Fuse the clients' tables (client weight x row counts) into the global tables in `buffers`, once."""
    for m in MODS:
        held = [(p[m], w) for p, w in zip(protos, weights) if m in p and w > 0]
        if not held:
            continue
        shape = held[0][0][0].shape
        if any(t.shape != shape for (t, _), _ in held):  # only possible before the first fusion fixed the rows
            log(WARNING, "clients sent %r prototype tables of different shapes; fusing those shaped %s", m, shape)
            held = [((t, c), w) for (t, c), w in held if t.shape == shape]
        table = buffers.get(f"proto/{m}", np.zeros(shape, np.float32))
        counts = buffers.get(f"proto/{m}-count", np.zeros(shape[0], np.float32))
        if table.shape != shape:
            log(WARNING, "prototype tables of %r changed shape %s -> %s; restarting them", m, table.shape, shape)
            table, counts = np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)
        table, counts = fuse_prototypes(table, counts, [t for (t, _), _ in held], [c for (_, c), _ in held],
                                        np.array([w for _, w in held]), ema)
        buffers[f"proto/{m}"], buffers[f"proto/{m}-count"] = table, counts
