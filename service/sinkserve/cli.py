"""`sinkserve` command line: serve, cluster, chat, triton, gateway, eval-ppl, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sinkserve.bench import add_bench_parser
from sinkserve.chat import add_chat_parser
from sinkserve.cluster import add_cluster_parser
from sinkserve.config import ConfigError, add_engine_flags, engine_config
from sinkserve.gateway.cli import add_gateway_parser
from sinkserve.logs import configure_logging
from sinkserve.serve import add_serve_parser
from sinkserve.triton_server.cli import add_triton_parser


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from sinkserve.engine.loader import load_model
    from sinkserve.engine.perplexity import cache_shape, plot_running_ppl, read_text, streaming_nll
    from sinkserve.engine.runner import TorchRunner

    if args.rebuild_every < 0:
        print("--rebuild-every must be >= 0", file=sys.stderr)
        return 2
    text = read_text(args.text)
    sinks, window = cache_shape(args.mode, args.sinks, args.window, args.tokens)
    config = engine_config(args, sinks=sinks, window=window, max_sessions=1)
    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_model(config)
    tokens = tokenizer.encode(text)[: args.tokens + 1]
    if len(tokens) < args.tokens + 1:
        print(f"text has only {len(tokens)} tokens; need {args.tokens + 1}", file=sys.stderr)
        return 2
    if args.mode == "dense" and args.tokens > model.cfg.max_position:
        print("warning: dense past the training context is not meaningful", file=sys.stderr)
    runner = TorchRunner(config, model)
    with tqdm(total=args.tokens, desc=f"eval-ppl {args.mode}", unit="tok") as bar:
        result = streaming_nll(
            runner,
            tokens,
            chunk=args.chunk,
            rebuild_every=args.rebuild_every,
            on_progress=bar.update,
        )
    summary = {
        "mode": args.mode,
        "sinks": sinks,
        "window": window,
        "tokens": args.tokens,
        "ppl": round(result.ppl(), 4),
        "ppl_by_1k": [round(v, 4) for v in result.ppl_by_1k()],
        "rss_mb_by_1k": [round(v, 1) for v in result.rss_mb],
        "dtype": config.dtype,
        "chunk": args.chunk,
        "rebuild_every": args.rebuild_every,
    }
    if args.plot:
        plot_running_ppl(
            {args.mode: summary["ppl_by_1k"]}, args.plot, f"{args.mode} {sinks}+{window}"
        )
    if args.json:
        print(json.dumps(summary))
    else:
        rebuilt = f", rebuilt every {args.rebuild_every}" if args.rebuild_every else ""
        print(
            f"{args.mode} {sinks}+{window}: ppl {summary['ppl']} over {args.tokens} tokens{rebuilt}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinkserve", description=__doc__)
    parser.add_argument(
        "--log-json", action="store_true", default=None, help="JSON logs (default off a TTY)"
    )
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval-ppl", help="streaming perplexity of a long text")
    add_engine_flags(p)
    p.add_argument("--text", type=Path, required=True, help="text file (.gz ok)")
    p.add_argument("--tokens", type=int, default=8000)
    p.add_argument("--mode", choices=("sinks", "window", "dense"), default="sinks")
    p.add_argument("--chunk", type=int, default=1, help="tokens per step (1 = token by token)")
    p.add_argument(
        "--rebuild-every",
        type=int,
        default=0,
        help="recompute the cache from its token ids every N tokens, as a session moved "
        "without its KV is (0 = never)",
    )
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--plot", type=Path, help="PNG of perplexity per 1,000 tokens")
    p.set_defaults(func=cmd_eval_ppl)

    add_chat_parser(sub)
    add_serve_parser(sub)
    add_cluster_parser(sub)
    add_triton_parser(sub)
    add_gateway_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(json=args.log_json, level=args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:  # a bad flag value: say which, no traceback
        print(f"sinkserve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
