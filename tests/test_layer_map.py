"""The seed's check_valid_layermap rule, including its single-key exemption."""

import pytest

from compactor.storage.keys import KEY_MAX, KEY_MIN, key_from_int
from compactor.storage.layer_map import LayerMap, check_valid_layermap
from compactor.storage.layer_name import LayerName


def delta(k0: int, k1: int, l0: int, l1: int) -> LayerName:
    return LayerName.delta(key_from_int(k0), key_from_int(k1), l0, l1)


def image(k0: int, k1: int, lsn: int) -> LayerName:
    return LayerName.image(key_from_int(k0), key_from_int(k1), lsn)


def test_bands_are_valid() -> None:
    layers = [delta(0, 10, 10, 20), delta(10, 20, 10, 20), delta(0, 20, 20, 30), image(0, 20, 15)]
    assert check_valid_layermap(layers) is None


def test_overlapping_deltas_are_invalid() -> None:
    problem = check_valid_layermap([delta(0, 10, 10, 30), delta(5, 15, 20, 40)])
    assert problem is not None and "intersects" in problem


def test_bands_cut_elsewhere_but_disjoint_keys_are_valid() -> None:
    # The fast check fails ([10,30) is cut at 20 by the other layer) but no two deltas overlap.
    assert check_valid_layermap([delta(0, 10, 10, 30), delta(10, 20, 20, 40)]) is None


def test_single_key_deltas_may_split_lsn_ranges() -> None:
    # A hot single key split across LSNs, inside a band of ordinary deltas: the seed's picture.
    layers = [delta(0, 5, 10, 40), delta(5, 6, 10, 25), delta(5, 6, 25, 40), delta(6, 10, 10, 40)]
    assert check_valid_layermap(layers) is None


def test_single_key_deltas_still_may_not_overlap_in_slow_path() -> None:
    # The slow path looks at every delta, single-key ones included.
    layers = [delta(0, 5, 10, 40), delta(5, 10, 20, 30), delta(5, 6, 10, 25), delta(5, 6, 20, 40)]
    problem = check_valid_layermap(layers)
    assert problem is not None and "00000000000000000000000000000000000" in problem


def test_single_key_overlap_is_not_checked_when_fast_path_passes() -> None:
    # Exactly the seed: overlapping single-key deltas pass when no multi-key band is cut.
    layers = [delta(0, 5, 10, 40), delta(5, 6, 10, 25), delta(5, 6, 20, 40)]
    assert check_valid_layermap(layers) is None


def test_images_never_matter() -> None:
    assert check_valid_layermap([image(0, 10, 5), image(0, 10, 5), image(3, 4, 5)]) is None


def test_touching_ranges_do_not_overlap() -> None:
    layers = [delta(0, 10, 10, 20), delta(0, 10, 20, 30), delta(10, 20, 10, 30)]
    # [10,30) is cut at 20 by the first band; the slow path sees touching ranges only.
    assert check_valid_layermap(layers) is None


def test_l0_detection_and_overlap_selection() -> None:
    l0 = LayerName.delta(KEY_MIN, KEY_MAX, 30, 40)
    lm = LayerMap([l0, delta(0, 10, 10, 20), image(0, 10, 25)])
    assert lm.l0_deltas() == [l0]
    from compactor.storage.keys import KeyRange

    assert set(lm.overlapping(KeyRange(key_from_int(3), key_from_int(4)), lsn_max_inclusive=24)) == {
        delta(0, 10, 10, 20)
    }


@pytest.mark.parametrize(
    "text",
    [
        "000000000000000000000000000000000000-00000000000000000000000000000000000A__0000000000000010",
        "000000000000000000000000000000000001-000000000000000000000000000000000004__0000000000000020-0000000000000048",
    ],
)
def test_layer_names_round_trip(text: str) -> None:
    assert str(LayerName.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "../../etc/passwd",
        "000000000000000000000000000000000005-000000000000000000000000000000000004__0000000000000010",
        "000000000000000000000000000000000001-000000000000000000000000000000000004__0000000000000048-0000000000000020",
        "000000000000000000000000000000000001-000000000000000000000000000000000004__00000000000010",
    ],
)
def test_bad_layer_names_rejected(text: str) -> None:
    from compactor.storage.errors import InvalidInput

    with pytest.raises(InvalidInput):
        LayerName.parse(text)
