"""Timeline JSON (``compactor.timeline/v1``): parsing with full validation, and rendering.

Parsing produces layers as sorted version lists ready to be written as layer files; nothing
is written by this module, so a failed validation leaves the store untouched.
"""

import base64
import itertools
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

from compactor.storage.errors import InvalidInput, validation_summary
from compactor.storage.ids import HexId
from compactor.storage.keys import KeyRange, format_key, parse_key
from compactor.storage.layer_map import check_valid_layermap
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import Ancestor, GcInfo, KeyHex, Lsn, TimelineSettings
from compactor.storage.redo import record_from_json, record_to_json
from compactor.storage.values import ValueKind, Version

FORMAT = "compactor.timeline/v1"


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError("not valid base64") from None


Base64Bytes = Annotated[bytes, BeforeValidator(_b64), WithJsonSchema({"type": "string", "contentEncoding": "base64"})]
# What the validators check, said in the published schema (docs/timeline-format.md) too.
Key = Annotated[KeyHex, WithJsonSchema({"type": "string", "pattern": "^[0-9A-Fa-f]{36}$"})]
Id = Annotated[HexId, WithJsonSchema({"type": "string", "pattern": "^[0-9a-f]{32}$"})]
_WAL_RECORD: dict[str, Any] = {
    "type": "object",
    "description": "a WAL record; op names a registered redo op, which defines the other fields "
    "(op test: append, base64; clear; will_init; only_if, base64 or null)",
    "properties": {"op": {"type": "string"}},
    "required": ["op"],
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class ImageValueJson(_Model):
    key: Key
    image: Base64Bytes


class DeltaValueJson(_Model):
    """One version: exactly one of image and wal."""

    key: Key
    lsn: Lsn
    image: Base64Bytes | None = None
    wal: Annotated[dict[str, Any], WithJsonSchema(_WAL_RECORD)] | None = None


class ImageLayerJson(_Model):
    """An image layer at one LSN: covers keys [key_range[0], key_range[1])."""

    kind: Literal["image"]
    key_range: tuple[Key, Key]
    lsn: Lsn
    values: list[ImageValueJson]


class DeltaLayerJson(_Model):
    """A delta layer: keys [key_range[0], key_range[1]), LSNs [lsn_range[0], lsn_range[1])."""

    kind: Literal["delta"]
    key_range: tuple[Key, Key]
    lsn_range: tuple[Lsn, Lsn]
    values: list[DeltaValueJson]


class TimelineJson(_Model):
    """A timeline in the compactor.timeline/v1 format (docs/timeline-format.md)."""

    format: Literal["compactor.timeline/v1"]
    tenant_id: Id
    timeline_id: Id
    ancestor: Ancestor | None = None
    gc: GcInfo = Field(default_factory=GcInfo)
    keyspace: list[tuple[Key, Key]] | None = None
    settings: TimelineSettings = Field(default_factory=TimelineSettings)
    layers: list[Annotated[ImageLayerJson | DeltaLayerJson, Field(discriminator="kind")]]


@dataclass
class ParsedTimeline:
    tenant_id: str
    timeline_id: str
    ancestor: Ancestor | None
    gc: GcInfo
    keyspace: list[tuple[str, str]] | None
    settings: TimelineSettings
    layers: list[tuple[LayerName, list[Version]]]


def parse_timeline(text: str | bytes) -> ParsedTimeline:
    """Parse and fully validate a timeline document; raise ``InvalidInput`` with one line."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInput(f"timeline JSON is malformed: {err}") from None
    if not isinstance(raw, dict):
        raise InvalidInput("timeline JSON must be an object")
    if raw.get("format") != FORMAT:
        raise InvalidInput(f"unsupported timeline format {raw.get('format')!r}: expected {FORMAT!r}")
    try:
        doc = TimelineJson.model_validate(raw)
    except ValidationError as err:
        raise InvalidInput(f"invalid timeline JSON: {validation_summary(err, 'timeline')}") from None

    layers = [_layer(i, layer, doc.ancestor) for i, layer in enumerate(doc.layers)]
    names = [name for name, _ in layers]
    seen: set[LayerName] = set()
    for name in names:
        if name in seen:
            raise InvalidInput(f"layer {name} appears twice")
        seen.add(name)
    problem = check_valid_layermap(names)
    if problem:
        raise InvalidInput(f"invalid layer map: {problem}")
    for start, end in doc.keyspace or []:
        if start >= end:
            raise InvalidInput(f"keyspace range {start}-{end} is empty")
    if doc.ancestor is not None and doc.ancestor.timeline_id == doc.timeline_id:
        raise InvalidInput("a timeline cannot be its own ancestor")
    return ParsedTimeline(doc.tenant_id, doc.timeline_id, doc.ancestor, doc.gc, doc.keyspace, doc.settings, layers)


def _layer(
    index: int, layer: ImageLayerJson | DeltaLayerJson, ancestor: Ancestor | None
) -> tuple[LayerName, list[Version]]:
    where = f"layers[{index}]"
    keys = KeyRange(parse_key(layer.key_range[0]), parse_key(layer.key_range[1]))
    if keys.start >= keys.end:
        raise InvalidInput(f"{where}: empty key range {keys}")
    if isinstance(layer, ImageLayerJson):
        name = LayerName.image(keys.start, keys.end, layer.lsn)
        versions = [Version(parse_key(v.key), layer.lsn, ValueKind.IMAGE, v.image) for v in layer.values]
    else:
        start, end = layer.lsn_range
        if start >= end:
            raise InvalidInput(f"{where}: empty LSN range [{start}, {end})")
        name = LayerName.delta(keys.start, keys.end, start, end)
        versions = [_delta_value(f"{where}.values[{i}]", v) for i, v in enumerate(layer.values)]
    if not versions:
        raise InvalidInput(f"{where} ({name}): a layer must hold at least one value")
    versions.sort()
    for prev, cur in itertools.pairwise(versions):
        if prev.key == cur.key and prev.lsn == cur.lsn:
            raise InvalidInput(f"{where} ({name}): key {format_key(cur.key)} has two values at LSN {cur.lsn}")
    for version in versions:
        if not keys.contains(version.key):
            raise InvalidInput(f"{where} ({name}): key {format_key(version.key)} outside the layer's key range")
        if not name.lsn_start <= version.lsn < name.lsn_end:
            raise InvalidInput(
                f"{where} ({name}): key {format_key(version.key)} at LSN {version.lsn} "
                f"outside the layer's LSN range [{name.lsn_start}, {name.lsn_end})"
            )
        if ancestor is not None and version.lsn <= ancestor.lsn:
            raise InvalidInput(
                f"{where} ({name}): LSN {version.lsn} is at or below the branch point {ancestor.lsn}; "
                "that history belongs to the ancestor"
            )
    return name, versions


def _delta_value(where: str, value: DeltaValueJson) -> Version:
    key = parse_key(value.key)
    if (value.image is None) == (value.wal is None):
        raise InvalidInput(f"{where}: exactly one of 'image' and 'wal' must be given")
    if value.image is not None:
        return Version(key, value.lsn, ValueKind.IMAGE, value.image)
    try:
        payload, will_init = record_from_json(value.wal)
    except InvalidInput as err:
        raise InvalidInput(f"{where}: {err}") from None
    return Version(key, value.lsn, ValueKind.INIT_RECORD if will_init else ValueKind.RECORD, payload)


def render_layer(name: LayerName, versions: list[Version]) -> dict[str, Any]:
    keys = [format_key(name.key_range.start), format_key(name.key_range.end)]
    if not name.is_delta:
        return {
            "kind": "image",
            "key_range": keys,
            "lsn": name.image_lsn,
            "values": [{"key": format_key(v.key), "image": base64.b64encode(v.payload).decode()} for v in versions],
        }
    values: list[dict[str, Any]] = []
    for v in versions:
        item: dict[str, Any] = {"key": format_key(v.key), "lsn": v.lsn}
        if v.kind == ValueKind.IMAGE:
            item["image"] = base64.b64encode(v.payload).decode()
        else:
            item["wal"] = record_to_json(v.payload)
        values.append(item)
    return {"kind": "delta", "key_range": keys, "lsn_range": [name.lsn_start, name.lsn_end], "values": values}
