"""docs/openai.md as written: every `curl` line of its `sh` blocks and its Python example
run against a real gateway and Triton (only the port is swapped), so the docs and the
server cannot drift apart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys

from openai import AsyncOpenAI

from sinkserve.gateway.server import Gateway
from tests.gateway.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs" / "openai.md"
DOCUMENTED = "127.0.0.1:8080"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOCS.read_text(), flags=re.S | re.M)


def curl_lines() -> list[str]:
    return [
        line for block in blocks("sh") for line in block.splitlines() if line.startswith("curl ")
    ]


async def run(*command: str) -> tuple[int, str, str]:
    """Run a command beside the gateway (which serves from this event loop)."""
    env = {**os.environ, "SINKSERVE_TOKEN": "alice-token"}
    child = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_the_docs_curl_lines_run_as_written(api: Gateway, client: AsyncOpenAI) -> None:
    lines = curl_lines()
    assert len(lines) >= 5 and all(DOCUMENTED in line for line in lines)
    for line in lines:
        code, out, err = await run(
            "bash", "-c", line.replace(DOCUMENTED, f"127.0.0.1:{api.http_port}")
        )
        assert code == 0, (line, err)
        if '"stream": true' in line:  # server-sent events, ending as the API says
            assert (
                "response.completed" in out
                or "response.incomplete" in out
                or (out.rstrip().endswith("data: [DONE]"))
            ), out
            assert "event: error" not in out and 'data: {"error"' not in out, out
            continue
        body = json.loads(out)
        assert body.get("error") is None, (line, body)  # a response has "error": null
        if body.get("object") == "conversation":
            await client.conversations.delete(body["id"])


async def test_the_docs_python_example_runs_as_written(api: Gateway) -> None:
    (example,) = blocks("python")
    code, out, err = await run(
        sys.executable, "-c", example.replace(DOCUMENTED, f"127.0.0.1:{api.http_port}")
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all("prefilled" in line for line in lines), out
    print(out)  # what docs/openai.md quotes
