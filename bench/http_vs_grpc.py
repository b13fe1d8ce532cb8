"""HTTP front vs gRPC: time to first token and decode tokens/s of the same generation on the same daemon.

One daemon serves both (unix-socket gRPC and ``--http`` on loopback); each round runs the same greedy
generation once over gRPC Generate (``mlxd_client``) and once over ``POST /v1/completions`` with
``stream: true``, both with the official ``openai`` client and with a bare ``http.client`` reader of the event
stream (which shows what the server costs apart from the SDK's own parsing), rotating who goes first. All are timed
on the client side: time to first token = request sent -> first text arrived; tokens/s = tokens after the first /
time after the first. Prints medians with p10/p90 and the HTTP/gRPC ratios.

Run ``python bench/http_vs_grpc.py`` (Llama-3.2-1B shape, random bf16 weights, cached in .demo/) or ``--tiny`` for a
quick check on the test-sized Llama.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, machine

PROMPT = "Once upon a time, in a small village by the sea, there lived"
Timing = tuple[float, float]  # (seconds to first token, decode tokens per second)


def model_dir(tiny: bool, root: Path) -> Path:
    """The HF checkpoint to serve: the 1B-shaped Llama bench/convert.py builds, or a tiny one."""
    if not tiny:
        from convert import llama_1b

        return llama_1b()
    from mlxd_daemon.fixtures.llama import make_llama

    return make_llama(root / "hf-tiny-llama", size="tiny", seed=0)


def over_grpc(client: object, model: Path, max_tokens: int) -> Timing:
    from mlxd.v1 import mlxd_pb2 as pb

    start = time.perf_counter()
    first, count = 0.0, 0
    for event in client.generate_events(model, PROMPT, max_tokens=max_tokens):  # type: ignore[attr-defined]
        if isinstance(event, pb.GeneratedToken):
            count += 1
            if not first and event.text:
                first = time.perf_counter()
    return first - start, (count - 1) / (time.perf_counter() - first)


def over_http(api: object, model: Path, max_tokens: int) -> Timing:
    start = time.perf_counter()
    first, count = 0.0, 0
    stream = api.completions.create(model=str(model), prompt=PROMPT, max_tokens=max_tokens, stream=True,  # type: ignore[attr-defined]
                                    temperature=0, stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and not first:
            first = time.perf_counter()
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return first - start, (count - 1) / (time.perf_counter() - first)


def over_raw_http(address: str, token: str, model: Path, max_tokens: int) -> Timing:
    """The same request as ``over_http``, read with the standard library: one ``data:`` line per event."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port))
    body = json.dumps({"model": str(model), "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                       "temperature": 0, "stream_options": {"include_usage": True}})  # fmt: skip
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {token}",
                                                   "Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    first, count = 0.0, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["text"] and not first:
            first = time.perf_counter()
        if chunk.get("usage"):
            count = chunk["usage"]["completion_tokens"]
    conn.close()
    return first - start, (count - 1) / (time.perf_counter() - first)


def summary(values: list[float], scale: float = 1.0) -> str:
    p = statistics.quantiles(values, n=10, method="inclusive")
    return f"{statistics.median(values) * scale:8.2f} (p10 {p[0] * scale:.2f}, p90 {p[-1] * scale:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the test-sized Llama (a quick check, not a benchmark)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    a = parser.parse_args()
    import openai
    from mlxd_client import Client
    from mlxd_client.discovery import is_serving

    with tempfile.TemporaryDirectory(prefix="mlxd-bench-http-") as tmp:
        root = Path(tmp)
        src = model_dir(a.tiny, root)
        dst = CACHE / "bench-mlx-llama-1b" if not a.tiny else root / "mlx-tiny-llama"  # bench/infer.py writes it too
        address = f"unix://{root}/mlxd.sock"
        proc = subprocess.Popen([sys.executable, "-m", "mlxd_daemon", "--address", address, "--http", "127.0.0.1:0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            while not is_serving(address, timeout=0.5):
                time.sleep(0.1)
            with Client(address, autostart=False) as client:
                if not (dst / "config.json").exists():
                    client.convert(src, dst)
                token = (root / "token").read_text().strip()
                base = f"http://{client.server_info.http_address}/v1"
                api = openai.OpenAI(base_url=base, api_key=token, max_retries=0)
                runs: dict[str, Callable[[], Timing]] = {
                    "gRPC": lambda: over_grpc(client, dst, a.max_tokens),
                    "HTTP": lambda: over_http(api, dst, a.max_tokens),
                    "HTTP raw": lambda: over_raw_http(client.server_info.http_address, token, dst, a.max_tokens),
                }
                for run in runs.values():  # warm-up: load the model, first-call costs
                    run()
                results: dict[str, list[Timing]] = {name: [] for name in runs}
                names = list(runs)
                for i in range(a.rounds):
                    for name in names[i % 3 :] + names[: i % 3]:  # rotate who goes first
                        results[name].append(runs[name]())
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"HTTP vs gRPC generate, {machine()}, {'tiny Llama' if a.tiny else 'Llama-3.2-1B shape bf16'}, "
          f"{a.rounds} rounds, {a.max_tokens} tokens, greedy")  # fmt: skip
    print(f"{'':<8} {'time to first token, ms':>36} {'decode tokens/s':>36}")
    for name, timings in results.items():
        print(f"{name:<8} {summary([t for t, _ in timings], 1e3):>36} {summary([r for _, r in timings]):>36}")
    ttft = {n: statistics.median(t for t, _ in results[n]) for n in results}
    tps = {n: statistics.median(r for _, r in results[n]) for n in results}
    for name in ("HTTP", "HTTP raw"):
        print(
            f"{name} (openai SDK)/gRPC:" if name == "HTTP" else f"{name} (http.client)/gRPC:",
            f"time to first token x{ttft[name] / ttft['gRPC']:.3f}, tokens/s x{tps[name] / tps['gRPC']:.3f}",
        )


if __name__ == "__main__":
    main()
