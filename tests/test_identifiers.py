"""Keys, LSNs and ids exactly as CONTRACTS §1 pins them."""

import pytest

from compactor.storage.errors import InvalidInput
from compactor.storage.ids import validate_id
from compactor.storage.keys import KEY_MAX, KEY_MIN, format_key, key_next, parse_key
from compactor.storage.layout import layers_prefix, manifest_key, manifest_number
from compactor.storage.lsn import parse_lsn


def test_key_parsing_is_case_insensitive_and_exact_length() -> None:
    assert parse_key("0" * 35 + "a") == parse_key("0" * 35 + "A")
    assert format_key(parse_key("ab" * 18)) == "AB" * 18
    for bad in ("0" * 35, "0" * 37, "g" * 36, ""):
        with pytest.raises(InvalidInput):
            parse_key(bad)


def test_key_next_carries() -> None:
    assert key_next(KEY_MIN) == bytes(17) + b"\x01"
    assert key_next(bytes(17) + b"\xff") == bytes(16) + b"\x01\x00"
    with pytest.raises(InvalidInput):
        key_next(KEY_MAX)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("42", 42), ("0x2A", 42), ("0/2A", 42), ("1/0", 1 << 32), ("FFFFFFFF/FFFFFFFF", 2**64 - 1)],
)
def test_lsn_forms(text: str, value: int) -> None:
    assert parse_lsn(text) == value


@pytest.mark.parametrize("text", ["-1", "0x", "1/2/3", "100000000/0", str(2**64), "abc", "1.5"])
def test_bad_lsns(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_lsn(text)


@pytest.mark.parametrize("bad", ["", "A" * 32, "0" * 31, "0" * 33, "../" + "0" * 29, "0" * 31 + "/"])
def test_ids_reject_anything_but_32_lowercase_hex(bad: str) -> None:
    with pytest.raises(InvalidInput):
        validate_id(bad)
    with pytest.raises(InvalidInput):
        layers_prefix(bad, "0" * 32)


def test_manifest_keys_sort_by_number() -> None:
    t = "a" * 32
    keys = [manifest_key(t, t, n) for n in (9, 10, 100, 2)]
    assert sorted(keys) == [manifest_key(t, t, n) for n in (2, 9, 10, 100)]
    assert [manifest_number(k) for k in keys] == [9, 10, 100, 2]
    assert manifest_number("tenants/x/manifest-latest") is None
