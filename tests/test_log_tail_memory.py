"""The last lines of a log are sent in CHUNK pieces, never gathered whole: a log of one
long line (output with no newline, a progress bar redrawn with \\r) asked for its last line
must not be read into one buffer, let alone rebuilt chunk by chunk (each chunk copied in
front of all the ones before it: quadratic, 12 s of a blocked event loop for a 50 MB log
here). Real app on a real unix socket; the memory is Python's own (tracemalloc)."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

import aiohttp

from ocp_agentd.api.app import create_app
from ocp_agentd.api.context import AppContext
from ocp_agentd.api.listeners import start_api
from ocp_agentd.config import Settings
from ocp_agentd.supervision import Supervisor

LOG_BYTES = 8 * 1024 * 1024
PEAK_LIMIT = LOG_BYTES // 4  # a few chunks in flight, not the log


def test_the_tail_of_a_log_of_one_long_line_is_streamed_not_gathered(tmp_path: Path) -> None:
    async def scenario() -> None:
        sock = tmp_path / "run" / "a.sock"
        settings = Settings(
            api={"socket": str(sock)},
            agent={"state_dir": str(tmp_path / "state"), "log_dir": str(tmp_path / "log")},
            programs={"noisy": {"command": ["/bin/true"],
                                "stdout_log": str(tmp_path / "log" / "noisy.out"),
                                "stderr_log": str(tmp_path / "log" / "noisy.err")}},
        )
        supervisor = Supervisor(settings)
        path = Path(supervisor.info("noisy").log_files[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            for _ in range(LOG_BYTES // (1024 * 1024)):
                out.write(b"\r42%" * (256 * 1024))
        server = await start_api(create_app(AppContext(settings, supervisor)), settings)
        try:
            connector = aiohttp.UnixConnector(path=str(sock))
            async with aiohttp.ClientSession(connector=connector) as http:
                tracemalloc.start()
                try:
                    received = 0
                    async with http.get("http://agent/api/v1/processes/noisy/logs",
                                        params={"tail": "1"}) as answer:
                        assert answer.status == 200, await answer.text()
                        async for piece in answer.content.iter_chunked(64 * 1024):
                            assert set(piece) <= set(b"\r42%")
                            received += len(piece)
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
            assert received == LOG_BYTES  # the last line is the whole log
            assert peak < PEAK_LIMIT, f"{peak} bytes at once for a {LOG_BYTES}-byte tail"
        finally:
            await server.close()
            await supervisor.close()

    asyncio.run(scenario())
