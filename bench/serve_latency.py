"""Cold start and single-request latency of the serve stage, merged model vs. base + adapter, on the tiny recipe.

Both servers are started by the serve stage itself (`qlora_app.serve.stage.running`, the code path of
`qlora-app serve`), one after the other on the same machine, on the same trained run:
  - merged:  the run's merged model
  - adapter: the built-in base with the run's LoRA adapter (vLLM --enable-lora), asked by adapter id
Cold start is launch to a 200 from /health. Latency is one request at a time (no concurrency), the same
question each time, greedy, answers of 8-9 tokens; we report the median and p90 over the timed requests
after a few warm-up ones, and time to first token from streamed requests.

    python bench/serve_latency.py                      # trains and merges tiny first if needed (~1 min)
    python bench/serve_latency.py --out docs/measurements/serve-latency-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qlora_app.demo import free_port
from qlora_app.pipeline import ensure_merged, ensure_trained
from qlora_app.recipe.loader import load_recipe
from qlora_app.serve.stage import running
from qlora_app.serve.target import adapter_target, merged_target

QUESTION = [{"role": "user", "content": "What is the capital of Lomito?"}]


def timed_requests(url: str, model: str, n: int, warmup: int = 3) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    ask = dict(model=model, messages=QUESTION, temperature=0, max_tokens=32)
    for _ in range(warmup):
        client.chat.completions.create(**ask)
    latencies, ttfts, tokens = [], [], 0
    for _ in range(n):
        started = time.perf_counter()
        reply = client.chat.completions.create(**ask)
        latencies.append(time.perf_counter() - started)
        tokens = reply.usage.completion_tokens
        started = time.perf_counter()
        with client.chat.completions.create(**ask, stream=True) as stream:  # closed: the server sees no open stream
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    ttfts.append(time.perf_counter() - started)
                    break
    client.close()
    latencies.sort()
    return {"requests": n, "completion_tokens": tokens, "answer": reply.choices[0].message.content,
            "latency_median_ms": round(1000 * statistics.median(latencies), 1),
            "latency_p90_ms": round(1000 * latencies[int(0.9 * (n - 1))], 1),
            "ttft_median_ms": round(1000 * statistics.median(ttfts), 1)}


def measure(name: str, target, root: Path, n: int) -> dict:
    started = time.perf_counter()
    with running(target, "127.0.0.1", free_port(), root, echo=False) as endpoint:
        cold = time.perf_counter() - started  # includes our pre-start checks
        model = target.adapters[0].name if target.adapters else target.served_name
        result = {"mode": name, "cold_start_s": round(cold, 1), **timed_requests(endpoint.url, model, n)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    recipe = load_recipe("tiny")
    run = ensure_trained(recipe, args.runs_dir)
    ensure_merged(run, recipe)
    results = [measure("merged", merged_target(run, recipe), args.runs_dir, args.requests),
               measure("adapter", adapter_target(recipe, {"capitals": run}), args.runs_dir, args.requests)]
    report = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, CPU",
              "recipe": "tiny", "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'mode':8} {'cold start':>11} {'latency p50':>12} {'p90':>8} {'TTFT p50':>9}")
    for r in results:
        print(f"{r['mode']:8} {r['cold_start_s']:>10.1f}s {r['latency_median_ms']:>10.1f}ms "
              f"{r['latency_p90_ms']:>6.1f}ms {r['ttft_median_ms']:>7.1f}ms")


if __name__ == "__main__":
    main()
