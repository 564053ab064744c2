"""The published OpenAPI spec against the real server, by schemathesis (its CLI, as users run it):
every generated request — schema-valid and not, with and without a key — gets an answer the spec
allows (status, content type, headers, body schema, SSE events), never a 5xx; invalid requests are
refused and valid ones accepted (except for the cross-field rules listed in schemathesis_hooks.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_server_harness import KEYS, running, serve, tiny_engine

OPERATOR = "sk-ops-schemathesis"  # also a tenant, so one header reaches /v1 and /metrics
EXAMPLES_PER_OPERATION = 40
SEED = 20261201


def test_the_server_answers_as_its_spec_says(tmp_path: Path) -> None:
    with running(tiny_engine(num_blocks=256, max_model_len=256)) as aengine, \
            serve(aengine, {**KEYS, OPERATOR: "ops"}, admin_keys=(OPERATOR,)) as srv:
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        cli = Path(sys.executable).with_name("schemathesis")
        result = subprocess.run(
            [str(cli), "run", f"{srv.url}/openapi.json", "--checks", "all", "--max-examples",
             str(EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--generation-deterministic", "--no-color",
             "--header", f"Authorization: Bearer {OPERATOR}", "--request-timeout", "60",
             "--report", "junit", "--report-dir", str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        srv.check_integrity()
        assert srv.stats()["blocks_in_use"] == 0
    summary = result.stdout[-6000:]
    assert result.returncode == 0, summary
    # the one warning allowed: random ids get 404s from the routes of stored responses (their real
    # ids come from a created response; test_server_responses.py drives those routes with the SDK)
    warned = "Missing test data: 3 operations repeatedly returned 404" in result.stdout and all(
        route in result.stdout for route in ("GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}",
                                             "GET /v1/responses/{response_id}/input_items"))
    assert "No issues found" in result.stdout or (warned and "Failures:" not in result.stdout), summary
    assert "Tested: 12" in result.stdout, summary  # every operation ran (12 in the spec)
