"""The app fuzzed against its own OpenAPI schema by Schemathesis' engine, as ``schemathesis run --checks all`` does:
every phase (schema examples, coverage of each constraint's edges, random fuzzing, stateful sequences), valid and
invalid data, every check (no 5xx, status codes / content types / bodies / headers as documented, schema-invalid
requests refused, schema-valid ones accepted, 405 with a matching Allow for undeclared methods) over every
operation. Any finding fails the test with the curl command that reproduces it.

Three things steer generation towards where bugs were: the ids of the indexed images (so id-taking operations reach
past the 404 into the model), prompt templates with format fields, and the folders and formats the index holds (from
GET /api/facets, so filtered searches and duplicates reach past the 422 for an unknown one into the filtered
search). Refusals the schema cannot express are allowed for the operations that have them: an upload that is no
image (415), weights that cancel out (422), and, on every operation that pages or filters, a cursor that no page of
this query and generation has (422, 409), a folder, camera or format no image has or an inverted date range (422).
And one rule JSON Schema cannot state: an integer field takes an integer token only (``7``, not ``7.0``; JSON
Schema calls both integers and Schemathesis sends both), so generated bodies spell whole numbers as integers;
tests/app/test_hostile_input.py checks that ``7.0`` is refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema

from app.main import create_app
from tests.app.conftest import IndexedFolder

MAX_EXAMPLES = 100  # per operation and phase: about 2,400 requests, under a minute on 2 cores (printed by the test)
SEED = 16
pytestmark = pytest.mark.slow  # about a minute of fuzzing: left out of make check
REQUEST_TIMEOUT_S = 120  # a schema-valid classification can ask for 100 labels x 80 templates of 1,000 characters
UPLOADS = ["POST /api/search/image", "POST /api/embed/image", "POST /api/describe/upload", "POST /api/classify/upload"]
NOT_AN_IMAGE = ["2xx", 401, 403, 404, 409, 415]  # any non-empty bytes fit the schema's file part
CANCELLING_WEIGHTS = ["2xx", 401, 403, 404, 409, 422]
STALE_OR_FOREIGN_CURSOR = ["2xx", 401, 404, 409, 422]  # a cursor (or a folder) the schema accepts but no page has
PAGED = ["GET /api/duplicates", "GET /api/search", "GET /api/images/{image_id}/similar"]
KNOWN_VALUE_PROBABILITY = 0.5  # how often a folder or format filter takes a value the index holds
HOSTILE_TEMPLATES = ["{} {x}", "{!r} {}", "{.__class__} {}", "{0} {}", "{{}}{:>200000000}", "{:}", "{} {}", "}{}"]


@pytest.fixture(scope="module")
def fuzzed_app(indexed: IndexedFolder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    """The app over the shared index with its lifespan running; admin endpoints on (the admin key is not sent,
    so they answer 401 without starting a reindex)."""
    app = create_app(indexed.settings(tmp_path_factory.mktemp("fuzz"), admin_api_key="fuzz-admin"), watch=False)
    with TestClient(app):
        yield app


def fuzz_config(image_ids: list[int], facets: dict[str, Any]) -> SchemathesisConfig:
    """What ``schemathesis.toml`` would hold for this run (``facets``: the body of GET /api/facets)."""
    folders = [f["value"] for f in facets["folders"]]
    formats = [f["value"] for f in facets["formats"]]
    known = {"dictionary": "folders", "probability": KNOWN_VALUE_PROBABILITY}
    known_format = {"dictionary": "formats", "probability": KNOWN_VALUE_PROBABILITY}
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "cache": {"enabled": False},  # nothing written into the working directory
            "workers": 1,
            "request-timeout": REQUEST_TIMEOUT_S,
            "checks": {"enabled": True},
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
            "dictionaries": {
                "ids": {"values": image_ids},
                "templates": {"values": HOSTILE_TEMPLATES},
                "folders": {"values": [*folders, *(f"{folder}/" for folder in folders)]},
                "formats": {"values": [*formats, *(f.upper() for f in formats)]},
            },
            "parameters": {
                "path.image_id": {"dictionary": "ids", "probability": 0.7},
                "body.image_id": {"dictionary": "ids", "probability": 0.7},
                "body.parts[*].image_id": {"dictionary": "ids", "probability": 0.7},
                "body.templates[*]": {"dictionary": "templates", "probability": 0.3},
                "query.folder": known,
                "query.format": known_format,
                "body.filters.folder[*]": known,
                "body.filters.format[*]": known_format,
            },
            "operations": [
                {
                    "include-name": [name for name in UPLOADS if name != "POST /api/search/image"],
                    "checks": {"positive_data_acceptance": {"expected-statuses": NOT_AN_IMAGE}},
                },
                {
                    "include-name": "POST /api/search/image",
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*NOT_AN_IMAGE, 422]}},
                },
                {
                    "include-name": "POST /api/search/combined",
                    "checks": {"positive_data_acceptance": {"expected-statuses": CANCELLING_WEIGHTS}},
                },
                {
                    "include-name": PAGED,
                    "checks": {"positive_data_acceptance": {"expected-statuses": STALE_OR_FOREIGN_CURSOR}},
                },
            ],
        }
    )


def integer_tokens(value: Any) -> Any:
    """``value`` with every whole float (``7.0``) spelled as an integer (``7``), recursively."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integer_tokens(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integer_tokens(item) for item in value]
    return value


def test_schemathesis_finds_nothing_with_every_check_over_every_operation(fuzzed_app: FastAPI) -> None:
    with TestClient(fuzzed_app) as client:
        hits = client.get("/api/search", params={"q": "anything", "k": 1000}).json()["results"]
        facets = client.get("/api/facets").json()
    image_ids = sorted(hit["id"] for hit in hits)
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app, config=fuzz_config(image_ids, facets))
    schema.hook("map_body")(lambda context, body: integer_tokens(body))
    started = time.perf_counter()
    findings: set[str] = set()
    errors: list[str] = []
    tested: dict[str, int] = {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            if event.label is not None:
                tested[event.label] = tested.get(event.label, 0) + len(event.recorder.cases)
            findings.update(_findings(event))
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(str(getattr(event, "info", event)))
    elapsed = time.perf_counter() - started
    print(f"schemathesis: {sum(tested.values())} requests over {len(tested)} operations in {elapsed:.1f} s")
    assert errors == []
    assert findings == set(), "\n\n".join(sorted(findings))
    operations = [op.ok().label for op in schema.get_all_operations()]
    assert set(operations) <= set(tested), set(operations) - set(tested)


def _findings(event: Any) -> Iterator[str]:
    """One line per failed check of a scenario: phase, operation, failure code and title, and the curl command."""
    for checks in event.recorder.checks.values():
        for check in checks:
            if check.status == Status.FAILURE and check.failure_info is not None:
                failure = check.failure_info.failure
                yield (
                    f"{event.phase.name} {event.label}: {failure.code} {failure.title}\n"
                    f"{check.failure_info.code_sample}"
                )


def test_every_operation_is_documented_with_an_example(fuzzed_app: FastAPI, tmp_path: Path) -> None:
    spec = fuzzed_app.openapi()
    assert spec["info"]["description"]
    components = spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary") and operation.get("description"), f"{method} {path}"
            ok = operation["responses"].get("200") or operation["responses"].get("202")
            ref = ok.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
            if ref:
                name = ref.rsplit("/", 1)[-1]
                assert "example" in components[name], f"{method} {path}"
