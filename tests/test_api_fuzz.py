"""Schemathesis over the server's own OpenAPI document, against a real server (real
models, real knowledge bases): no request the schema allows, nor any it forbids,
may get a 5xx, an undocumented status, or a body that contradicts the schema.
Bounded: a fixed number of generated cases per operation, no deadline."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance

from api.app import create_app
from settings import Settings
from tests.live_server import LiveServer, serving_state

EXAMPLES_PER_OPERATION = 20
schema = schemathesis.openapi.from_dict(create_app(Settings(home=Path(tempfile.gettempdir()) / "zhiku-openapi")).openapi())


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, models_dir, embedder):
    docs = tmp_path_factory.mktemp("fuzz-docs")
    (docs / "manual.txt").write_text("退款政策：购买后七天内可以申请无理由退款。The server listens on port 8000.", encoding="utf-8")
    server_settings = Settings(
        home=tmp_path_factory.mktemp("fuzz-home"),
        models_dir=models_dir,
        generator_max_batch_size=4,
        max_tokens_limit=8,  # generated requests stay cheap
        max_upload_bytes=200_000,
    )
    with serving_state(server_settings, embedder, {"manual": docs}, default_kb="manual") as state, LiveServer.serving(state) as live:
        yield live


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_and_only_documented_answers(case, fuzz_server):
    case.call_and_validate(
        base_url=fuzz_server.url,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
        timeout=120,
    )
