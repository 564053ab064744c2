"""``promptcache`` command line: generate, make-model, explain, serve, bench."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from promptcache.bench.cli import add_bench_parser
from promptcache.engine.config import add_engine_flags
from promptcache.server.cli import add_serve_parser


def _generate(args: argparse.Namespace) -> int:
    from promptcache.engine.config import engine_config_from_args
    from promptcache.engine.llm_engine import LLMEngine
    from promptcache.engine.request import RequestSpec
    from promptcache.engine.sampling import SamplingParams

    engine = LLMEngine(engine_config_from_args(args))
    tok = engine.tokenizer
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop or [],
    )
    start = time.perf_counter()
    engine.add_request(RequestSpec("cli", ids, params))
    first = None
    out = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None:
                first = time.perf_counter() - start
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    total = time.perf_counter() - start
    sys.stdout.write("\n")
    if out is not None:
        u = out.usage
        print(f"[{u.prompt_tokens} prompt tokens, {u.completion_tokens} generated, finish={out.finish_reason}, "
              f"ttft {first or 0:.3f}s, total {total:.3f}s; {engine.precision}]", file=sys.stderr)
    return 0


def _make_model(args: argparse.Namespace) -> int:
    from promptcache.model.shapes import write_checkpoint

    out = write_checkpoint(args.shape, args.out, dtype=args.dtype, seed=args.seed)
    print(f"wrote random-weight {args.shape} checkpoint to {out}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    import json

    from promptcache.model.loader import resolve_model_dir
    from promptcache.server.explain import explain_pair, report
    from promptcache.tokenizer import Tokenizer

    bodies = []
    for path in (args.a, args.b):
        try:
            with open(path, encoding="utf-8") as f:
                bodies.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: {e}") from None
        if not isinstance(bodies[-1], dict):
            raise ValueError(f"{path}: a request body is a JSON object")
    if args.block_size < 1:
        raise ValueError("--block-size must be >= 1")
    tok = Tokenizer(resolve_model_dir(args.model))
    diag, _, _ = explain_pair(tok, bodies[0], bodies[1], args.block_size, dialect=args.dialect)
    sys.stdout.write(json.dumps(diag.as_dict(), indent=2) + "\n" if args.json else report(diag))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("promptcache")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcache", description=__doc__)
    parser.add_argument("--version", action="version", version=f"promptcache {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="one-shot generation, streamed to the terminal")
    add_engine_flags(g)
    g.add_argument("prompt", nargs="?", default="def fibonacci(n):",
                   help="the text to continue (default: 'def fibonacci(n):', which the demo model completes)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0: all (default: 0)")
    g.add_argument("--seed", type=int, default=None, help="sampler seed (default: none)")
    g.add_argument("--stop", action="append", help="stop string (repeatable; default: none)")
    g.set_defaults(func=_generate)

    m = sub.add_parser("make-model", help="write a random-weight Hugging Face checkpoint of a named shape")
    m.add_argument("--shape", required=True, help="a named shape, e.g. tiny, smollm2-135m")
    m.add_argument("--out", required=True, help="directory to write")
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weights' dtype (default: bfloat16)")
    m.add_argument("--seed", type=int, default=0, help="weights' seed (default: 0)")
    m.set_defaults(func=_make_model)

    e = sub.add_parser("explain", help="where and why request B would miss the cache after request A (offline)",
                       description="Render two request bodies (OpenAI chat or completions, Anthropic messages) "
                                   "with the model's chat template, as the server does, and print where B "
                                   "departs from A, the text on both sides, and how many tokens B would reuse.")
    e.add_argument("a", metavar="A.json", help="the earlier request body")
    e.add_argument("b", metavar="B.json", help="the later request body")
    e.add_argument("--model", default=None, help="model (hub id, directory, random:<shape>; default: the embedded "
                   "demo model) whose tokenizer and chat template render the prompts")
    e.add_argument("--dialect", choices=["openai-chat", "openai-completions", "anthropic"], default=None,
                   help="the bodies' dialect (default: detected)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block (the server's --block-size)")
    e.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    e.set_defaults(func=_explain)

    add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"promptcache: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
