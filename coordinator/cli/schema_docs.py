"""JSON Schemas in the docs, generated from the pydantic models: the task payloads in
docs/task-api.md and the timeline format in docs/timeline-format.md.

Each schema sits in the doc under a ``<!-- schema: Name -->`` marker, as a JSON code block.
``python -m compactor.coordinator.cli.schema_docs`` rewrites those blocks from the models, and a test fails
when a doc and its models have drifted apart.
"""

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from compactor.storage.timeline_json import TimelineJson
from compactor.worker.runtime.payloads import PAYLOADS

DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"
DOCS: dict[str, dict[str, type[BaseModel]]] = {
    "task-api.md": PAYLOADS,
    "timeline-format.md": {"TimelineJson": TimelineJson},
}
_BLOCK = re.compile(r"<!-- schema: (\w+) -->\s*```json\n(.*?)\n```", flags=re.DOTALL)


def generated(models: dict[str, type[BaseModel]]) -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema() for name, model in models.items()}


def documented(markdown: str) -> dict[str, dict[str, Any]]:
    """The schemas a doc shows, by name."""
    return {name: json.loads(body) for name, body in _BLOCK.findall(markdown)}


def regenerate(markdown: str, schemas: dict[str, dict[str, Any]]) -> str:
    """``markdown`` with every schema block replaced by the schema of that name."""

    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"<!-- schema: {name} -->\n```json\n{json.dumps(schemas[name], indent=2)}\n```"

    return _BLOCK.sub(block, markdown)


if __name__ == "__main__":
    for doc, models in DOCS.items():
        path = DOCS_DIR / doc
        path.write_text(regenerate(path.read_text(), generated(models)))
