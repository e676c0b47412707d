"""bench/long_text.py's HTML extraction and bench/ppl_long.py end to end on a short text
on the CPU (the 4-million-token run itself is on the GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.long_text import html_text

REPO = Path(__file__).resolve().parents[2]


def test_html_keeps_paragraphs_and_leaves_out_code_navigation_and_labels(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text(
        "<html><head><title>Not this</title><style>p {}</style></head><body>"
        "<nav><p>Previous chapter and next chapter</p></nav>"
        "<h1>A heading of words</h1>"
        "<p>First   paragraph,\n with <code>inline code</code> &amp; an entity.</p>"
        "<pre>for line in lines: print(line)</pre>"
        "<ul><li>An item of a list</li><li>Two</li></ul>"
        "<script>var skipped = 'a script body';</script></body></html>"
    )
    assert html_text(page).splitlines() == [
        "A heading of words",
        "First paragraph, with inline code & an entity.",
        "An item of a list",
    ]


def test_a_short_stream_scores_every_token_in_both_modes_with_blocks(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text((REPO / ".cache" / "kjv-psalms.txt").read_text()[:40_000])
    out = tmp_path / "ppl.json"
    command = [
        sys.executable, "bench/ppl_long.py", "run", "--text", str(text), "--tokens", "3000",
        "--chunk", "256", "--block", "1000", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    got = json.loads(out.read_text())
    assert set(got["modes"]) == {"sinks", "window"}
    for mode in got["modes"].values():
        assert len(mode["ppl_by_block"]) == 3 and len(mode["rss_mb_by_block"]) == 3
        assert mode["nan_or_inf"] == 0 and 1 < mode["ppl"] < 1000
    # Under the 1,024-token cache both modes see the same tokens: the same scores.
    assert got["modes"]["sinks"]["ppl_by_block"][0] == got["modes"]["window"]["ppl_by_block"][0]
    plot = [sys.executable, "bench/ppl_long.py", "plot", str(out)]
    subprocess.run(plot, cwd=REPO, check=True, capture_output=True)
    assert out.with_suffix(".png").stat().st_size > 10_000
