"""schemathesis against /openapi.json: generated requests, valid and not, to every route (the streaming ones
left out) of the app on a real Redis with a recording dispatcher, so nothing is queued for real. No
response may be a 5xx, break its documented schema, or carry a status its route does not document."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import redis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis import CheckContext, GenerationMode, Response
from schemathesis.openapi import from_wsgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import DispatchRecorder
from trainer_api import create_app
from trainer_store.settings import Settings

if TYPE_CHECKING:  # pragma: no cover - schemathesis declares its OpenAPI case type for checkers only
    from schemathesis.specs.openapi.schemas import OpenApiCase

# Per generated case: enough to reach every route's validation and errors; all of them take about 15 s.
EXAMPLES = 100
STREAMING_SUFFIXES = ("/logs/stream", "/events")


def generated_cases() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) for every operation but the streaming ones, read from the document itself:
    valid requests for each, and invalid ones for each that takes a body or query fields."""
    spec = create_app(Settings(), dispatch=lambda *_: None).test_client().get("/openapi.json").get_json()
    cases = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters" or path.endswith(STREAMING_SUFFIXES):
                continue
            cases.append((method.upper(), path, GenerationMode.POSITIVE))
            takes_input = "requestBody" in operation or any(
                parameter["in"] in ("query", "header") for parameter in operation.get("parameters", [])
            )
            if takes_input:
                cases.append((method.upper(), path, GenerationMode.NEGATIVE))
    return cases


def status_documented(ctx: CheckContext, response: Response, case: OpenApiCase) -> bool:
    """The status is one the operation lists itself, not only covered by its `default` response."""
    documented = case.operation.definition.raw["responses"]
    assert str(response.status_code) in documented, (
        f"{case.operation.label} answered {response.status_code}, which it does not document "
        f"({sorted(documented)}): {response.text[:300]}"
    )
    return True


@pytest.fixture
def app(settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder) -> Flask:
    """The API as deployed: signed links switched on, so the links route answers as it does there."""
    return create_app(replace(settings, link_secret="fuzz-link-secret"), dispatch=dispatched)


@pytest.mark.parametrize(("method", "path", "mode"), generated_cases())
def test_every_route_answers_as_documented(app: Flask, method: str, path: str, mode: GenerationMode) -> None:
    operation = from_wsgi("/openapi.json", app)[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def answers_as_documented(case: OpenApiCase) -> None:
        # A request the schema allows may still name a corpus that does not exist: a 422 is right then,
        # so "valid data is accepted" does not apply here; everything else schemathesis checks does.
        case.call_and_validate(
            additional_checks=[status_documented], excluded_checks=[positive_data_acceptance]
        )

    answers_as_documented()
