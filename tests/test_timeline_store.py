"""Timelines through a real S3 endpoint: import/export round trips, validation that writes
nothing, reads equal to an independent replay, and damaged layer objects reported as such."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compactor.coordinator.cli.main import main
from compactor.storage.errors import CorruptLayer, InvalidInput, RedoError
from compactor.storage.keys import key_to_int
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from tests.conftest import make_s3_settings
from tests.timelines import CHILD, PARENT, TENANT, Layer, Timeline, Value, record, reference_read, timelines


def small_timeline() -> dict[str, Any]:
    layers = [
        Layer("image", (0, 10), (16, 17), {1: [Value(16, image=b"value")], 3: [Value(16, image=b"three")]}),
        Layer("delta", (1, 4), (32, 72), {1: [Value(40, record=record(b"@0x28"))], 3: [Value(48, image=b"new")]}),
    ]
    return Timeline(PARENT, layers, cutoff=48, retain_lsns=[16, 32]).to_json()


@pytest.fixture
def storage(s3_settings: Settings) -> Storage:
    store = Storage(s3_settings)
    store.objects.ensure_bucket()
    return store


def objects_in(storage: Storage) -> list[str]:
    return [info.key for info in storage.objects.list_keys("")]


def test_import_export_import_round_trips(storage: Storage, s3_endpoint: str, tmp_path: Path) -> None:
    doc = small_timeline()
    storage.import_timeline(json.dumps(doc))
    exported = storage.export_timeline(TENANT, PARENT)
    assert exported["layers"] == doc["layers"]
    assert exported["gc"] == doc["gc"]
    other = Storage(make_s3_settings(s3_endpoint, tmp_path / "other"))
    other.objects.ensure_bucket()
    other.import_timeline(json.dumps(exported))
    assert other.export_timeline(TENANT, PARENT) == exported


def test_reads_follow_the_contract(storage: Storage) -> None:
    storage.import_timeline(json.dumps(small_timeline()))
    manifest = storage.manifest(TENANT, PARENT)
    at = lambda lsn: {key_to_int(k): v for k, v in storage.read(manifest, lsn)}  # noqa: E731
    assert at(15) == {}
    assert at(16) == {1: b"value", 3: b"three"}
    assert at(40) == {1: b"value@0x28", 3: b"three"}
    assert at(48) == {1: b"value@0x28", 3: b"new"}


def _mutations() -> list[tuple[str, Any, str]]:
    def bad(path: list[Any], value: Any) -> Any:
        doc = small_timeline()
        target = doc
        for step in path[:-1]:
            target = target[step]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return doc

    return [
        ("not json", "{", "malformed"),
        ("wrong format", bad(["format"], "other/v2"), "unsupported timeline format"),
        ("bad tenant", bad(["tenant_id"], "../../etc"), "tenant_id"),
        ("uppercase timeline", bad(["timeline_id"], PARENT.upper()), "timeline_id"),
        ("short key", bad(["layers", 0, "key_range", 0], "00"), "key"),
        ("inverted keys", bad(["layers", 0, "key_range"], ["0" * 35 + "9", "0" * 35 + "1"]), "empty key range"),
        ("inverted lsns", bad(["layers", 1, "lsn_range"], [72, 32]), "empty LSN range"),
        ("value outside keys", bad(["layers", 1, "values", 0, "key"], "0" * 35 + "9"), "outside the layer's key range"),
        ("value outside lsns", bad(["layers", 1, "values", 0, "lsn"], 99), "outside the layer's LSN range"),
        ("negative lsn", bad(["layers", 1, "values", 0, "lsn"], -1), "lsn"),
        ("bad base64", bad(["layers", 0, "values", 0, "image"], "%%%"), "base64"),
        ("will_init without clear", bad(["layers", 1, "values", 0, "wal", "will_init"], True), "will_init"),
        ("unknown op", bad(["layers", 1, "values", 0, "wal", "op"], "postgres"), "unknown WAL record op"),
        ("image and wal", bad(["layers", 1, "values", 0, "image"], "eA=="), "exactly one"),
        ("unknown field", bad(["layers", 0, "extra"], 1), "extra"),
        ("missing layers", bad(["layers"], KeyError), "layers"),
        ("empty layer", bad(["layers", 0, "values"], []), "at least one value"),
        (
            "overlapping deltas",
            {
                **small_timeline(),
                "layers": [*small_timeline()["layers"], {**small_timeline()["layers"][1], "lsn_range": [40, 80]}],
            },
            "invalid layer map",
        ),
        ("missing ancestor", bad(["ancestor"], {"timeline_id": CHILD, "lsn": 10}), "ancestor timeline"),
    ]


@pytest.mark.parametrize(("label", "doc", "message"), _mutations(), ids=[m[0] for m in _mutations()])
def test_import_rejects_invalid_input_and_writes_nothing(storage: Storage, label: str, doc: Any, message: str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(InvalidInput, match=message) as err:
        storage.import_timeline(text)
    assert "\n" not in str(err.value)
    assert objects_in(storage) == [], f"{label}: import left objects behind"


def test_second_import_is_rejected(storage: Storage) -> None:
    storage.import_timeline(json.dumps(small_timeline()))
    before = objects_in(storage)
    with pytest.raises(InvalidInput, match="already exists"):
        storage.import_timeline(json.dumps(small_timeline()))
    assert objects_in(storage) == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_layer_objects_are_reported(storage: Storage, damage: str) -> None:
    storage.import_timeline(json.dumps(small_timeline()))
    manifest = storage.manifest(TENANT, PARENT)
    entry = next(e for e in manifest.layers.values() if e.layer.is_delta)
    data = storage.objects.get_bytes(entry.object_key)
    if damage == "truncate":
        storage.objects.put_bytes(entry.object_key, data[: len(data) // 2])
    elif damage == "flip":
        storage.objects.put_bytes(entry.object_key, data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        storage.objects.delete(entry.object_key)
    with pytest.raises(CorruptLayer) as err:
        list(storage.read(manifest, 100))
    assert entry.name in str(err.value) and entry.object_key in str(err.value)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(tls=timelines(branch=True), lsn_pick=st.integers(0, 200))
def test_s3_reads_equal_reference(
    s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, tls: dict[str, Timeline], lsn_pick: int
) -> None:
    storage = Storage(make_s3_settings(s3_endpoint, tmp_path_factory.mktemp("s3prop")))
    storage.objects.ensure_bucket()
    for tl_id in (PARENT, CHILD):
        storage.import_timeline(json.dumps(tls[tl_id].to_json()))
    for tl_id in (PARENT, CHILD):
        manifest = storage.manifest(TENANT, tl_id)
        top = tls[tl_id].top_lsn
        for lsn in {lsn_pick % (top + 2), top}:
            expected = reference_read(tls, tl_id, lsn)
            got: dict[int, Any] = {}
            for k in expected:
                try:
                    got[k] = dict(storage.read(manifest, lsn, _one(k))).get(_key(k), None)
                except RedoError as err:
                    got[k] = err
            assert {k: v if isinstance(v, bytes) else "error" for k, v in got.items()} == {
                k: v if isinstance(v, bytes) else "error" for k, v in expected.items()
            }


def _key(k: int) -> bytes:
    from compactor.storage.keys import key_from_int

    return key_from_int(k)


def _one(k: int):  # type: ignore[no-untyped-def]
    from compactor.storage.keys import KeyRange, key_from_int

    return KeyRange(key_from_int(k), key_from_int(k + 1))


def test_cli_end_to_end(s3_settings: Settings, tmp_path: Path) -> None:
    env = {
        "COMPACTOR_S3_ENDPOINT_URL": s3_settings.s3_endpoint_url or "",
        "COMPACTOR_S3_BUCKET": s3_settings.s3_bucket,
        "COMPACTOR_S3_ACCESS_KEY_ID": "testing-key",
        "COMPACTOR_S3_SECRET_ACCESS_KEY": "testing-secret",
        "COMPACTOR_CACHE_DIR": str(tmp_path / "cli-cache"),
    }
    Storage(s3_settings).objects.ensure_bucket()
    runner = CliRunner()
    src = tmp_path / "tl.json"
    src.write_text(json.dumps(small_timeline()))
    res = runner.invoke(main, ["timeline", "import", str(src)], env=env)
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["timeline", "read", TENANT, PARENT, "--lsn", "0/28"], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"0" * 35 + "1": "dmFsdWVAMHgyOA==", "0" * 35 + "3": "dGhyZWU="}
    assert res.stderr.splitlines() == [
        "warning: LSN 0x28 is below the gc horizon 0x30 and is neither a retain LSN nor a lease; "
        "history below the horizon may be gone"
    ]
    for lsn in ("0x20", "0x30", "0x40"):  # a retain LSN, the horizon, above it: reads there are kept
        res = runner.invoke(main, ["timeline", "read", TENANT, PARENT, "--lsn", lsn], env=env)
        assert res.exit_code == 0 and res.stderr == "", (lsn, res.stderr)
    res = runner.invoke(main, ["timeline", "read", TENANT, PARENT, "--lsn", "40", "--key", "0" * 35 + "3"], env=env)
    assert json.loads(res.stdout) == {"0" * 35 + "3": "dGhyZWU="}
    res = runner.invoke(main, ["timeline", "layers", TENANT, PARENT, "--json"], env=env)
    rows = json.loads(res.stdout)
    assert {(r["kind"], tuple(r["lsn_range"])) for r in rows} == {("image", (16, 17)), ("delta", (32, 72))}
    assert all(r["file_size"] > 0 for r in rows)
    res = runner.invoke(main, ["timeline", "set-gc", TENANT, PARENT, "--cutoff", "0x40", "--leases", "20"], env=env)
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["timeline", "export", TENANT, PARENT], env=env)
    assert json.loads(res.stdout)["gc"] == {"cutoff": 64, "retain_lsns": [16, 32], "leases": [20]}
    res = runner.invoke(main, ["timeline", "read", TENANT, PARENT, "--lsn", "20"], env=env)
    assert res.exit_code == 0 and res.stderr == "", "a lease is kept"
    # one-line errors
    for args in (["timeline", "read", "bad", PARENT, "--lsn", "1"], ["timeline", "export", TENANT, CHILD]):
        res = runner.invoke(main, args, env=env)
        assert res.exit_code != 0
        assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: "), res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = runner.invoke(main, ["timeline", "import", str(bad)], env=env)
    assert res.exit_code == 1 and "malformed" in res.stderr
    assert copy.deepcopy(rows)


def test_layer_cache_stays_within_its_size_limit(s3_endpoint: str, tmp_path: Path) -> None:
    small = Storage(make_s3_settings(s3_endpoint, tmp_path, cache_max_bytes=1))
    small.objects.ensure_bucket()
    small.import_timeline(json.dumps(small_timeline()))
    manifest = small.manifest(TENANT, PARENT)
    expected = {key_to_int(k): v for k, v in small.read(manifest, 48)}
    cached = list((tmp_path / "cache" / "layers").glob("*.parquet"))
    assert len(cached) == 1, "only the most recent layer is kept over the limit"
    # evicted layers come back on demand, verified
    assert {key_to_int(k): v for k, v in small.read(manifest, 48)} == expected


def test_timeline_format_doc_is_current_and_its_example_imports(s3_settings: Settings) -> None:
    from compactor.coordinator.cli.schema_docs import DOCS, DOCS_DIR, documented, generated

    text = (DOCS_DIR / "timeline-format.md").read_text()
    assert documented(text) == generated(DOCS["timeline-format.md"]), (
        "regenerate: python -m compactor.coordinator.cli.schema_docs"
    )
    example = text.split("<!-- example -->\n```json\n", 1)[1].split("\n```", 1)[0]
    storage = Storage(s3_settings)
    storage.objects.ensure_bucket()
    manifest = storage.import_timeline(example)
    exported = storage.export_timeline(manifest.tenant_id, manifest.timeline_id)
    doc = json.loads(example)
    assert {k: exported[k] for k in ("format", "tenant_id", "timeline_id", "ancestor", "gc", "keyspace")} == {
        k: doc[k] for k in ("format", "tenant_id", "timeline_id", "ancestor", "gc", "keyspace")
    }
    assert [layer["values"] for layer in exported["layers"]] == [layer["values"] for layer in doc["layers"]]
