"""Property-based fuzzing of the app against its own OpenAPI schema (Schemathesis): whatever the generated input,
no 5xx, and every response matches what the schema declares (status codes, content types, bodies)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import IndexedFolder

SEMANTIC_422 = {"POST /api/search/combined"}
MAX_EXAMPLES = 40  # per operation: enough to probe each parameter's edges, and the whole file stays under a minute


@pytest.fixture(scope="module")
def fuzzed_app(indexed: IndexedFolder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    """The app over the shared index with its lifespan running; admin endpoints on (the admin key is not sent,
    so they answer 401 without starting a reindex)."""
    app = create_app(indexed.settings(tmp_path_factory.mktemp("fuzz"), admin_api_key="fuzz-admin"), watch=False)
    with TestClient(app):
        yield app


def operation_labels() -> list[str]:
    """ "GET /api/search", ... : one test per operation, read from an app that needs no index to give its schema."""
    probe = create_app(Settings(index_dir=Path("/nonexistent")), watch=False)
    return [op.ok().label for op in schemathesis.openapi.from_asgi("/openapi.json", probe).get_all_operations()]


@pytest.mark.parametrize("label", operation_labels())
def test_no_server_errors_and_responses_match_the_schema(fuzzed_app: FastAPI, label: str) -> None:
    """Schemathesis' own checks (not_a_server_error, status code / content type / body conformance, ...) on
    ``MAX_EXAMPLES`` generated requests. Driven through Hypothesis directly: Schemathesis' pytest plugin does not
    work with this pytest."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label

    # Some schema-valid requests are refused for what they mean, and rightly: any bytes are a valid file part but
    # only images are accepted, and weights that cancel out give a query with no direction. For those operations
    # the "valid data is accepted" check is left out; the 5xx and conformance checks still run on them.
    semantic = "multipart/form-data" in _content_types(operation) or label in SEMANTIC_422
    excluded = [positive_data_acceptance] if semantic else []

    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(excluded_checks=excluded)

    check()


def _content_types(operation: object) -> list[str]:
    return list(operation.get_request_payload_content_types())  # type: ignore[attr-defined]


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
                assert "example" in components[name], f"{method} {path}: {name}"
