"""Benchmark of the layer file format: write and read a realistic 256 MiB delta layer.

Run with ``python -m tests.bench_layer_file [--mib N] [--dir DIR]``. Every measured phase runs in
a fresh subprocess, warmed up with a 1 MiB layer, so that peak RSS (VmHWM, reset through
/proc/self/clear_refs) and pyarrow's pool high-water mark belong to that phase alone.

Content: 8 KiB page images, about half random bytes and half zeros or repeated text, each
followed by 5-20 small WAL records (test records of 16-200 bytes).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from compactor.storage.keys import KeyRange, key_from_int
from compactor.storage.layer_file import LayerReader, LayerWriter, versions_to_batch
from compactor.storage.layer_name import LayerName
from compactor.storage.redo import TestRecord
from compactor.storage.values import ValueKind, Version

MIB = 1 << 20
PAGE = 8192
# Pools large enough that repeats are far apart: Parquet compresses each ~1 MiB data page on
# its own, so a repeat more than a page away cannot be found by zstd.
PAGE_POOL = 1024
RECORD_POOL = 4096
_TEXT = b"INSERT INTO accounts VALUES (42, 'alice', 1000.00); -- "


def _make_page(rng: random.Random) -> bytes:
    random_part = rng.randbytes(PAGE // 2)
    text = (_TEXT * (PAGE // len(_TEXT) + 1))[: PAGE // 2]
    filler = bytes(PAGE // 2) if rng.random() < 0.5 else text
    return random_part + filler if rng.random() < 0.5 else filler + random_part


def _make_record(rng: random.Random) -> bytes:
    n = rng.randint(16, 200)
    append = rng.randbytes(n // 2) + _TEXT[: n - n // 2]
    return TestRecord(append, clear=False, will_init=False, only_if=None).payload()


def generate(total_bytes: int, seed: int = 1) -> Iterator[Version]:
    """Versions sorted by (key, lsn, kind) until about ``total_bytes`` of payload."""
    rng = random.Random(seed)
    pages = [_make_page(rng) for _ in range(PAGE_POOL)]
    records = [_make_record(rng) for _ in range(RECORD_POOL)]
    produced, key_no, page_no, record_no = 0, 0, 0, 0
    while produced < total_bytes:
        key = key_from_int(0x10000 + key_no)
        lsn = 0x1000 + rng.randrange(64)
        page = pages[page_no % PAGE_POOL]
        page_no += 1
        yield Version(key, lsn, ValueKind.IMAGE, page)
        produced += len(page) + 27
        for _ in range(rng.randint(5, 20)):
            lsn += rng.randint(1, 64)
            record = records[record_no % RECORD_POOL]
            record_no += 1
            yield Version(key, lsn, ValueKind.RECORD, record)
            produced += len(record) + 27
        key_no += 1


def layer_name() -> LayerName:
    return LayerName.delta(key_from_int(0x10000), key_from_int(0x1000000), 0x1000, 0x100000)


def _memory() -> dict[str, float]:
    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return {"vmhwm_mib": hwm / MIB, "pool_max_mib": pa.default_memory_pool().max_memory() / MIB}


def _warm_up(path: Path) -> None:
    """Load pyarrow's Parquet, zstd and compute code first: it would otherwise show in the
    phase's peak RSS as if the layer code had allocated it."""
    warm = path.with_name("warm-up")
    with LayerWriter(warm, row_group_bytes=64 << 10) as writer:
        for v in generate(MIB):
            writer.add(*v)
        writer.finish(layer_name())
    with LayerReader(warm) as reader:
        for _ in reader.iter_versions(KeyRange(key_from_int(0x10002), key_from_int(0x10010))):
            pass
    warm.unlink()


def _reset_hwm() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def phase_write(path: Path, mib: int, rg_mib: int, level: int, batched: bool) -> dict[str, Any]:
    # The input is generated on the fly (holding 256 MiB of versions would swamp the memory
    # figures); its cost alone is timed first so the writer's own throughput can be shown.
    start = time.perf_counter()
    for _ in generate(mib * MIB):
        pass
    generator_seconds = time.perf_counter() - start
    versions = generate(mib * MIB)
    raw = 0
    _warm_up(path)
    _reset_hwm()
    base = _memory()
    start = time.perf_counter()
    with LayerWriter(path, row_group_bytes=rg_mib * MIB, compression_level=level) as writer:
        if batched:
            chunk: list[Version] = []
            for v in versions:
                chunk.append(v)
                raw += len(v.payload) + 27
                if len(chunk) == 4096:
                    writer.add_batch(versions_to_batch(chunk))
                    chunk = []
            if chunk:
                writer.add_batch(versions_to_batch(chunk))
        else:
            for key, lsn, kind, payload in versions:
                writer.add(key, lsn, kind, payload)
                raw += len(payload) + 27
        estimate = writer.estimated_size
        info = writer.finish(layer_name())
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "generator_seconds": generator_seconds,
        "raw": raw,
        "size": info.size,
        "estimate": estimate,
        "base": base,
        "peak": _memory(),
    }


def phase_read(path: Path, mode: str) -> dict[str, Any]:
    _warm_up(path)
    _reset_hwm()
    base = _memory()
    start = time.perf_counter()
    rows = 0
    with LayerReader(path, name=layer_name()) as reader:
        if mode == "versions":
            for _ in reader.iter_versions():
                rows += 1
        else:
            for batch in reader.iter_batches():
                rows += batch.num_rows
        groups = reader.num_row_groups
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "rows": rows, "row_groups": groups, "base": base, "peak": _memory()}


def _run_phase(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench_layer_file", "--phase", *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def _mem(result: dict[str, Any]) -> str:
    peak, base = result["peak"], result["base"]
    return (
        f"VmHWM {peak['vmhwm_mib']:6.0f} MiB (base {base['vmhwm_mib']:.0f}), pool max {peak['pool_max_mib']:5.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--configs", default="4:1,8:1,16:1,4:3,8:3,16:3", help="row-group MiB:zstd level,...")
    parser.add_argument("--phase", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        kind, path = args.phase[0], Path(args.phase[1])
        if kind == "write":
            result = phase_write(
                path, int(args.phase[2]), int(args.phase[3]), int(args.phase[4]), args.phase[5] == "batch"
            )
        else:
            result = phase_read(path, args.phase[2])
        print(json.dumps(result))
        return

    mib = args.mib
    print(
        f"layer file benchmark: {mib} MiB of payload (8 KiB semi-compressible images + 5-20 WAL "
        f"records of 16-200 B per image), pyarrow {pa.__version__}, "
        f"{pa.default_memory_pool().backend_name} pool, {os.cpu_count()} CPUs"
    )
    print("throughput is payload MiB per second of wall time; VmHWM/pool are per-phase peaks")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "layer.parquet"
        for config in args.configs.split(","):
            rg, level = (int(x) for x in config.split(":"))
            modes = ["add", "batch"] if (rg, level) == (8, 1) else ["add"]
            for mode in modes:
                w = _run_phase("write", str(path), str(mib), str(rg), str(level), mode)
                raw, size, secs = int(w["raw"]), int(w["size"]), float(w["seconds"])
                own = secs - float(w["generator_seconds"])
                print(f"\nrow groups {rg} MiB, zstd {level}, write via {mode}():")
                print(
                    f"  write   {raw / MIB / secs:7.1f} MiB/s  {secs:5.2f} s "
                    f"(writer alone ~{raw / MIB / own:.0f} MiB/s)  file {size / MIB:.1f} MiB, "
                    f"ratio {raw / size:.2f}, estimate before finish {int(w['estimate']) / MIB:.1f} MiB; "
                    f"{_mem(w)}"
                )
            for read_mode in ("versions", "batches"):
                r = _run_phase("read", str(path), read_mode)
                secs = float(r["seconds"])
                print(
                    f"  read {read_mode:8} {raw / MIB / secs:7.1f} MiB/s  {secs:5.2f} s  "
                    f"{r['rows']} rows, {r['row_groups']} row groups; {_mem(r)}"
                )


if __name__ == "__main__":
    main()
