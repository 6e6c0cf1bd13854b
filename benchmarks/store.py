"""Append time of the HDF5 store over a long run: 200 appends of 4 MB records.

Each append is one ``top_eigen``-like record of 10⁶ float32 numbers (4 MB), timed
from ``Store.append`` to its return (the part and the index flushed to disk). Target:
the last appends take at most 2× the first (an append costs O(its records), not
O(the file)). Printed: the median of the first and of the last 10 appends, their
ratio, the index file's size and the bytes on disk. Alternately with each append,
the same bytes are written to a plain file, flushed and renamed (the disk's floor
for a crash-safe append), so a growth of the disk's own cost shows beside ours.

    python benchmarks/store.py [--appends 200] [--numbers 1000000] [--folder /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curvlab.storage import Record, Store, read  # noqa: E402


def _plain_append(folder: Path, step: int, data: bytes) -> None:
    temporary = folder / f".{step}.tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, folder / f"{step}.bin")
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def main() -> None:
    """Time every append; print the first and last ones' medians and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=200)
    parser.add_argument("--numbers", type=int, default=1_000_000)
    parser.add_argument("--folder", default=None, help="where the store is written (default: a temporary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "run.h5"
        store = Store(path)
        values = np.random.default_rng(0).standard_normal(args.numbers).astype(np.float32)
        plain = Path(folder) / "plain"
        plain.mkdir()
        times, floors = [], []
        for step in range(args.appends):
            record = Record("arrays", "vectors", step, {"values": values + step})
            start = time.perf_counter()
            store.append(record)
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            _plain_append(plain, step, record.data["values"].tobytes())
            floors.append(time.perf_counter() - start)
        first, last = statistics.median(times[:10]), statistics.median(times[-10:])
        floor_first, floor_last = statistics.median(floors[:10]), statistics.median(floors[-10:])
        on_disk = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.parent != plain)
        start = time.perf_counter()
        count = len(read(path))
        reading = time.perf_counter() - start
        print(
            f"{args.appends} appends of {values.nbytes / 1e6:.1f} MB records ({on_disk / 1e9:.2f} GB on disk)"
        )
        print(
            f"first 10 appends: median {first * 1e3:.1f} ms; last 10: {last * 1e3:.1f} ms; "
            f"ratio {last / first:.2f}"
        )
        print(
            f"plain file, same bytes, fsync + rename: first 10 {floor_first * 1e3:.1f} ms; "
            f"last 10 {floor_last * 1e3:.1f} ms; ratio {floor_last / floor_first:.2f}"
        )
        print(f"slowest append {max(times) * 1e3:.1f} ms; index file {path.stat().st_size / 1e3:.1f} kB")
        print(f"reading all {count} records back: {reading:.2f} s")
        print(
            f"a copy of the file per append (the former scheme) would copy {on_disk / 1e6:.0f} MB "
            "at the last one"
        )


if __name__ == "__main__":
    main()
