"""The Node.js example client (examples/node) completes a 2-turn chat through the gateway,
then resumes that session in a second run."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from tests.gateway.conftest import REPO_ROOT, GatewayFactory, served


async def run(*cmd: str, cwd: Path, timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace")


async def test_the_node_client_completes_a_two_turn_chat_then_resumes_the_session(
    make_gateway: GatewayFactory, triton_url: str, tmp_path: Path
) -> None:
    # A copy keeps the checkout free of node_modules; the layout (proto/ two levels up) stays.
    example = tmp_path / "examples" / "node"
    shutil.copytree(
        REPO_ROOT / "examples" / "node", example, ignore=shutil.ignore_patterns("node_modules")
    )
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "proto")
    rc, out = await run("npm", "ci", "--no-audit", "--no-fund", cwd=example, timeout=300)
    assert rc == 0, out
    gw = await served(make_gateway, triton_url)

    async def chat(*session_id: str) -> dict[str, Any]:
        rc, out = await run(
            "node", "chat.js", f"127.0.0.1:{gw.port}", "alice-token", *session_id,
            cwd=example, timeout=120,
        )  # fmt: skip
        assert rc == 0, out
        summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        assert len(summary["turns"]) == 2
        first, second = (t["usage"] for t in summary["turns"])
        assert second["cache_position"] > first["cache_position"] > 0
        assert all(t["finish_reason"] != "FINISH_REASON_UNSPECIFIED" for t in summary["turns"])
        return summary

    new = await chat()
    assert new["session_id"] and not new["resumed"]
    # Resuming sends the id as x-session-id metadata too (a mismatch would be refused).
    again = await chat(new["session_id"])
    assert again["session_id"] == new["session_id"] and again["resumed"]
    end_of_first_run = new["turns"][-1]["usage"]["cache_position"]
    assert again["turns"][0]["usage"]["cache_position"] > end_of_first_run
