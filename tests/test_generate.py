"""Generate through the daemon: tokens streamed over gRPC, equal to transformers' greedy decoding, cancellable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client import Client
from mlxd_client.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def llama(daemon: object, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mlxd_daemon.fixtures.llama import make_llama

    root = tmp_path_factory.mktemp("llama")
    src = make_llama(root / "hf", size="tiny", seed=0)
    with Client(daemon.address, autostart=False) as c:  # type: ignore[attr-defined]
        c.convert(src, root / "mlx")
    return src, root / "mlx"


EOS_ID = 1  # <|end_of_text|> in fixtures.llama's tokenizer


def hf_greedy(src: Path, prompt: str, n: int) -> list[int]:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(src)
    model = LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, ids.shape[1] :].tolist()


class TestGenerate:
    def test_streams_tokens_equal_to_transformers(self, client: Client, llama: tuple[Path, Path]) -> None:
        """Greedy tokens streamed by the daemon equal transformers' generate, and the result has tokens/s."""
        src, mlx = llama
        events = list(client.generate_events(mlx, "the quick brown fox", max_tokens=12))
        tokens = [e for e in events if isinstance(e, pb.GeneratedToken)]
        result = events[-1]
        assert isinstance(result, pb.GenerateResult)
        assert result.text == "".join(t.text for t in tokens)
        assert result.prompt_tokens > 0 and result.generation_tokens_per_second > 0
        assert result.finish_reason in ("stop", "length")
        expected = hf_greedy(src, "the quick brown fox", len(tokens))
        got = [t.token_id for t in tokens]
        stop = result.finish_reason == "stop"
        assert got[: len(got) - stop] == expected[: len(got) - stop]

    def test_chat_template_and_sampling(self, client: Client, llama: tuple[Path, Path]) -> None:
        """Chat messages are rendered with the model's template; a seeded sample is reproducible."""
        _, mlx = llama
        messages = [{"role": "user", "content": "hello there"}]
        a = client.generate(mlx, messages=messages, max_tokens=8, temperature=0.8, seed=3)
        b = client.generate(mlx, messages=messages, max_tokens=8, temperature=0.8, seed=3)
        assert a.text == b.text and a.prompt_tokens > 3

    def test_closing_the_stream_stops_generation(self, client: Client, llama: tuple[Path, Path]) -> None:
        """Closing the stream early cancels the work: the cancelled request never completes (the model's use
        count grows by the next request only), and the models worker serves that next request."""
        src, mlx = llama
        prompt = "once upon a time"
        # No stop token early in the greedy continuation, so only a cancel can end this request before the end.
        assert EOS_ID not in hf_greedy(src, prompt, 64)
        client.generate(mlx, "warm up", max_tokens=1)
        before = next(m.infer_count for m in client.list_models().models if m.id == str(mlx.resolve()))
        events = client.generate_events(mlx, prompt, max_tokens=300)  # without cancel: done in about a second
        next(iter(events))
        events.close()
        assert client.generate(mlx, "again", max_tokens=3).generation_tokens <= 3
        after = next(m.infer_count for m in client.list_models().models if m.id == str(mlx.resolve()))
        assert after == before + 1

    def test_infer_on_llama_says_use_generate(self, client: Client, llama: tuple[Path, Path]) -> None:
        """Infer on a text-generation model is INVALID_ARGUMENT with reason USE_GENERATE."""
        with pytest.raises(InvalidArgumentError) as err:
            client.infer(llama[1], texts=["x"])
        assert err.value.reason == "USE_GENERATE"

    def test_mlxctl_generate_json(self, daemon: object, llama: tuple[Path, Path]) -> None:
        """`mlxctl --json generate` prints one JSON object with the text and tokens/s."""
        env = {**os.environ, "MLXD_ADDRESS": daemon.address}  # type: ignore[attr-defined]
        proc = subprocess.run([sys.executable, "-m", "mlxd_client.cli", "--json", "generate", str(llama[1]), "hi",
                               "--max-tokens", "5"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert {"text", "finish_reason", "generation_tokens_per_second", "prompt_tokens"} <= set(out)
