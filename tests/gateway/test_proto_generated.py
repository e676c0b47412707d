from __future__ import annotations

import filecmp
from pathlib import Path

from sinkserve.gateway import protogen


def test_committed_generated_code_matches_the_proto(tmp_path: Path) -> None:
    fresh = protogen.generate(out_dir=tmp_path / "_proto")
    stale = [
        str(p.relative_to(tmp_path))
        for p in fresh
        if not filecmp.cmp(p, protogen.OUT_DIR / p.relative_to(tmp_path / "_proto"), shallow=False)
    ]
    committed = {
        p.relative_to(protogen.OUT_DIR)
        for p in protogen.OUT_DIR.rglob("*")
        if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }
    generated = {p.relative_to(tmp_path / "_proto") for p in fresh}
    extra = sorted(str(p) for p in committed - generated)
    assert not stale and not extra, (
        f"service/sinkserve/gateway/_proto is stale (differs: {stale}, not generated: {extra}); "
        f"regenerate with `{protogen.REGEN_COMMAND}` and commit the result"
    )
