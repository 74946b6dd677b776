"""The bucket layout: every object key is built here, and only from validated ids.

```
tenants/{tenant}/timelines/{timeline}/manifests/{number:020d}.json   numbered, create-only
tenants/{tenant}/timelines/{timeline}/manifest-boundary.json         lowest number still valid
tenants/{tenant}/timelines/{timeline}/manifest-latest                hint: a recent number
tenants/{tenant}/timelines/{timeline}/layers/{uuid}                  immutable layer objects
tenants/{tenant}/timelines/{timeline}/meta-stats/{job id}.json       meta-job statistics
```
"""

import re
import uuid

from compactor.storage.ids import validate_id

MANIFEST_DIGITS = 20


def timeline_prefix(tenant_id: str, timeline_id: str) -> str:
    validate_id(tenant_id, "tenant id")
    validate_id(timeline_id, "timeline id")
    return f"tenants/{tenant_id}/timelines/{timeline_id}/"


def manifests_prefix(tenant_id: str, timeline_id: str) -> str:
    return timeline_prefix(tenant_id, timeline_id) + "manifests/"


def manifest_key(tenant_id: str, timeline_id: str, number: int) -> str:
    if not 0 <= number < 10**MANIFEST_DIGITS:
        raise ValueError(f"manifest number {number} out of range")
    return f"{manifests_prefix(tenant_id, timeline_id)}{number:0{MANIFEST_DIGITS}d}.json"


def manifest_number(object_key: str) -> int | None:
    """The number of a manifest object key, or None if the key is not one."""
    leaf = object_key.rsplit("/", 1)[-1]
    stem, dot, ext = leaf.partition(".")
    if dot and ext == "json" and len(stem) == MANIFEST_DIGITS and stem.isdigit():
        return int(stem)
    return None


def boundary_key(tenant_id: str, timeline_id: str) -> str:
    return timeline_prefix(tenant_id, timeline_id) + "manifest-boundary.json"


def latest_hint_key(tenant_id: str, timeline_id: str) -> str:
    return timeline_prefix(tenant_id, timeline_id) + "manifest-latest"


def layers_prefix(tenant_id: str, timeline_id: str) -> str:
    return timeline_prefix(tenant_id, timeline_id) + "layers/"


def new_layer_key(tenant_id: str, timeline_id: str) -> str:
    """A fresh object key for a layer: a unique id, so that uploads of different attempts never
    overwrite each other, and independent of the layer's name, which a streaming upload does
    not know yet when it starts (the manifest keeps the name beside the key)."""
    return f"{layers_prefix(tenant_id, timeline_id)}{uuid.uuid4().hex}"


# Keys of older versions are ``{layer name}-{uuid}``: names are hex, '-' and '_'.
_LAYER_LEAF = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]*")


def is_layer_key(tenant_id: str, timeline_id: str, object_key: str) -> bool:
    """Whether ``object_key`` can be a layer object of this timeline: right under its layers
    prefix, one plain path segment."""
    prefix = layers_prefix(tenant_id, timeline_id)
    return object_key.startswith(prefix) and _LAYER_LEAF.fullmatch(object_key[len(prefix) :]) is not None


def meta_stats_key(tenant_id: str, timeline_id: str, job_id: str) -> str:
    validate_id(job_id, "job id")
    return timeline_prefix(tenant_id, timeline_id) + f"meta-stats/{job_id}.json"


def parse_timeline_prefix(object_key: str) -> tuple[str, str] | None:
    """``(tenant, timeline)`` of an object key under ``tenants/``, or None."""
    parts = object_key.split("/")
    if len(parts) >= 4 and parts[0] == "tenants" and parts[2] == "timelines":
        try:
            return validate_id(parts[1]), validate_id(parts[3])
        except Exception:
            return None
    return None
