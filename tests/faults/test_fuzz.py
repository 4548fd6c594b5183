"""Hostile input, generated: schemathesis fuzzes every operation of /api/v1/openapi.json
over TCP loopback with a bearer token. No answer may be a 5xx, every answer must carry
the envelope with a documented code, and schemathesis' own checks (status codes and
content types as documented, responses matching their schemas) must pass.

    FAULTS_FUZZ_EXAMPLES=<n>   examples per operation (default 12)
"""

from __future__ import annotations

import os
import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from faultlib import envelope_problem, token_entry
from harness import DaemonPool, DaemonRunner, free_port
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

pytestmark = pytest.mark.faults

EXAMPLES = int(os.environ.get("FAULTS_FUZZ_EXAMPLES", "12"))
TOKEN = secrets.token_hex(16)
ALL = ["HOST_VIEWER", "HOST_MANAGER", "TASK_VIEWER", "TASK_MANAGER"]
SEEN: Counter[int] = Counter()


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory) -> Iterator[tuple[DaemonRunner, str]]:
    pool = DaemonPool(tmp_path_factory.mktemp("fuzz"))
    port = free_port()
    tokens = [token_entry("fuzzer", TOKEN, ALL)]
    try:
        runner = pool.make(overrides={"api": {"tcp": f"127.0.0.1:{port}", "tokens": tokens}},
                           wait_running=True)
        yield runner, f"http://127.0.0.1:{port}"
        assert runner.running, f"the daemon died under fuzzing:\n{runner.log()[-3000:]}"
    finally:
        pool.cleanup()


@pytest.fixture
def api_schema(fuzz_daemon: tuple[DaemonRunner, str]) -> Any:
    _, base = fuzz_daemon
    return schemathesis.openapi.from_url(
        f"{base}/api/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )


# Answers that stream until the client goes away (SPEC section 12): a 200 is judged by its
# status line and content type, then dropped; any other answer is an envelope as usual.
STREAMS = {"/api/v1/events": "text/event-stream", "/api/v1/processes/{name}/logs": "text/plain"}


def _check(case: Any, base: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    stream = STREAMS.get(case.path)
    if stream is not None:
        # schemathesis reads a whole body before it answers: ask for this one ourselves.
        kwargs = case.as_transport_kwargs(base_url=base, headers=auth)
        with requests.request(**kwargs, stream=True, timeout=30) as streamed:
            SEEN[streamed.status_code] += 1
            if streamed.status_code == 200:
                content_type = streamed.headers.get("Content-Type", "")
                assert content_type.startswith(stream), (
                    f"{case.method} {case.formatted_path}: 200 with Content-Type "
                    f"{content_type!r}"
                )
                return
    response = case.call(base_url=base, headers=auth, timeout=120)
    if stream is None:
        SEEN[response.status_code] += 1
    raw = case.path in ("/metrics", "/api/v1/openapi.json") and response.status_code == 200
    if not raw:
        try:
            body = response.json()
        except ValueError:
            body = None
        problem = envelope_problem(response.status_code, body)
        assert problem is None, f"{case.method} {case.formatted_path}: {problem}"
    case.validate_response(response)


def test_fuzz_every_route(api_schema: Any, fuzz_daemon: tuple[DaemonRunner, str],
                          figures: dict[str, Any]) -> None:
    runner, base = fuzz_daemon
    failures: list[str] = []
    operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            def fuzz(case: Any) -> None:
                _check(case, base)

            try:
                fuzz()
            except Exception as exc:  # one operation's finding; go on with the others
                failures.append(f"{operation.label} ({mode.value}): {exc}"[:1500])
        assert runner.running, f"the daemon died under fuzzing:\n{runner.log()[-3000:]}"
    figures.update({
        "operations fuzzed": operations,
        "requests": sum(SEEN.values()),
        "HTTP statuses": dict(sorted(SEEN.items())),
        "5xx": sum(n for status, n in SEEN.items() if status >= 500),
        "findings": len(failures),
    })
    assert not failures, "\n\n".join(failures)
