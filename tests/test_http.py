"""The OpenAI-compatible HTTP front, driven by the official ``openai`` package against a live daemon that also
serves gRPC: the same models, the same tokens, the same embeddings."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import DaemonProcess
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client import Client
from mlxd_client.errors import InvalidArgumentError

PROMPT = "once upon a time"  # the tiny Llama's greedy continuation of this runs the full max_tokens
MAX_GENERATIONS = 10


@pytest.fixture(scope="module")
def served() -> Iterator[DaemonProcess]:
    """A daemon on a unix socket that also serves HTTP on a free loopback port (at most 10 generations at once)."""
    with tempfile.TemporaryDirectory(prefix="mlxd-http-") as root:
        d = DaemonProcess(Path(root), "--http", "127.0.0.1:0", "--max-generations", str(MAX_GENERATIONS))
        yield d
        d.stop()


@pytest.fixture(scope="module")
def grpc(served: DaemonProcess) -> Iterator[Client]:
    with served.client() as c:
        yield c


@pytest.fixture(scope="module")
def api(served: DaemonProcess, grpc: Client) -> openai.OpenAI:
    """The official client, pointed at the daemon's HTTP address with its token as the API key."""
    token = (served.socket.parent / "token").read_text().strip()
    return openai.OpenAI(base_url=f"http://{grpc.server_info.http_address}/v1", api_key=token, max_retries=0)


@pytest.fixture(scope="module")
def models(grpc: Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama, BERT and CLIP checkpoints converted by the daemon (so it knows them by alias)."""
    from mlxd_daemon.fixtures import make_bert, make_clip
    from mlxd_daemon.fixtures.llama import make_llama

    root = tmp_path_factory.mktemp("http-models")
    out = {}
    for name, make in (("llama", make_llama), ("bert", make_bert), ("clip", make_clip)):
        src = make(root / f"hf-{name}", seed=0)
        grpc.convert(src, root / f"tiny-{name}")
        out[name] = root / f"tiny-{name}"
    return out


def grpc_tokens(grpc: Client, model: Path, prompt: str = "", **options: object) -> tuple[list[str], pb.GenerateResult]:
    events = list(grpc.generate_events(model, prompt, **options))  # type: ignore[arg-type]
    return [e.text for e in events if isinstance(e, pb.GeneratedToken)], events[-1]


def mlxctl_generate(served: DaemonProcess, model: Path, *options: str) -> dict[str, object]:
    """`mlxctl --json generate MODEL PROMPT OPTIONS...` against the served daemon."""
    env = {**os.environ, "MLXD_ADDRESS": served.address}
    cmd = [sys.executable, "-m", "mlxd_client.cli", "--json", "generate", str(model), PROMPT, *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


class TestModels:
    def test_lists_converted_and_resident_models_with_alias(
        self, api: openai.OpenAI, grpc: Client, models: dict[str, Path]
    ) -> None:
        """GET /v1/models lists every converted model by directory path, with its directory name as alias."""
        grpc.load_model(models["bert"])
        listed = {m.id: m for m in api.models.list().data}
        assert {str(p) for p in models.values()} <= set(listed)
        assert listed[str(models["llama"])].alias == "tiny-llama"  # type: ignore[attr-defined]
        assert listed[str(models["bert"])].resident is True  # type: ignore[attr-defined]

    def test_listing_does_not_wait_for_a_running_generation(
        self, api: openai.OpenAI, grpc: Client, served: DaemonProcess, models: dict[str, Path]
    ) -> None:
        """GET /v1/models answers while a long generation holds the models worker (from its last listing)."""
        holder = grpc.generate_events(models["llama"], PROMPT, max_tokens=1900)
        next(iter(holder))
        assert str(models["bert"]) in {m.id for m in api.models.list().data}
        holder.close()  # cancelled only if the listing came back before the generation ended
        assert grpc.generate(models["llama"], PROMPT, max_tokens=1).generation_tokens == 0  # runs after the cancel
        assert any('"generate_cancelled"' in line for line in served.log.read_text().splitlines())


class TestCompletions:
    def test_completion_equals_mlxctl_generate(self, api: openai.OpenAI, served: DaemonProcess,
                                               models: dict[str, Path]) -> None:  # fmt: skip
        """A greedy completion (by alias) has the text and token count `mlxctl generate` prints."""
        expected = mlxctl_generate(served, models["llama"], "--max-tokens", "12")
        got = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0)
        assert got.choices[0].text == expected["text"]
        assert got.choices[0].finish_reason == expected["finish_reason"] == "length"
        assert got.usage is not None
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (expected["prompt_tokens"], 12)

    def test_streamed_completion_ends_with_finish_reason(self, api: openai.OpenAI, grpc: Client,
                                                         models: dict[str, Path]) -> None:  # fmt: skip
        """A streamed completion's pieces join to gRPC Generate's text; the last chunk carries the reason."""
        pieces, result = grpc_tokens(grpc, models["llama"], PROMPT, max_tokens=10)
        chunks = list(api.completions.create(model=str(models["llama"]), prompt=PROMPT, max_tokens=10, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == result.text == "".join(pieces)
        assert chunks[-1].choices[0].finish_reason == "length"

    def test_sampling_settings_give_the_same_tokens_as_grpc(self, api: openai.OpenAI, grpc: Client,
                                                            models: dict[str, Path]) -> None:  # fmt: skip
        """temperature, top_p and seed reach the same sampler: equal settings, equal text on both fronts."""
        options = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.8, "seed": 7}
        expected = grpc.generate(models["llama"], PROMPT, **options).text
        got = api.completions.create(model="tiny-llama", prompt=PROMPT, **options)  # type: ignore[call-overload]
        assert got.choices[0].text == expected
        other_seed = api.completions.create(model="tiny-llama", prompt=PROMPT, **{**options, "seed": 8})  # type: ignore[call-overload]
        assert other_seed.choices[0].text != expected

    def test_chat_plain_and_streamed_use_the_chat_template(self, api: openai.OpenAI, grpc: Client,
                                                           models: dict[str, Path]) -> None:  # fmt: skip
        """Chat (plain and streamed, with usage) equals gRPC Generate with the same messages."""
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
        pieces, result = grpc_tokens(grpc, models["llama"], messages=messages, max_tokens=8)
        plain = api.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8)  # type: ignore[arg-type]
        assert plain.choices[0].message.content == result.text
        assert plain.usage is not None and plain.usage.prompt_tokens == result.prompt_tokens
        assert plain.usage.completion_tokens == len(pieces)
        stream = api.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, stream=True,  # type: ignore[arg-type]
                                             stream_options={"include_usage": True})  # fmt: skip
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == result.text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(pieces)

    def test_model_without_chat_template_gets_plain_text(self, api: openai.OpenAI, grpc: Client,
                                                         models: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
        """Without a chat template, HTTP chat joins the contents by blank lines into a plain prompt; gRPC refuses."""
        plain = tmp_path / "no-template-llama"
        shutil.copytree(models["llama"], plain)
        config = plain / "tokenizer_config.json"
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}))
        (plain / "chat_template.jinja").unlink(missing_ok=True)
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
        expected = grpc.generate(plain, "be brief\n\n" + PROMPT, max_tokens=8).text
        got = api.chat.completions.create(model=str(plain), messages=messages, max_tokens=8)  # type: ignore[arg-type]
        assert got.choices[0].message.content == expected
        with pytest.raises(InvalidArgumentError) as err:
            grpc.generate(plain, messages=messages, max_tokens=2)
        assert err.value.reason == "NO_CHAT_TEMPLATE"

    def test_stop_string_ends_text_before_it_over_both_fronts(
        self, api: openai.OpenAI, grpc: Client, served: DaemonProcess, models: dict[str, Path]
    ) -> None:
        """A stop string ends the text just before it (finish "stop"), the same for `mlxctl generate --stop`
        (gRPC) and HTTP, plain and streamed."""
        full = grpc.generate(models["llama"], PROMPT, max_tokens=24).text
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        cut = full[: full.index(stop)]
        via_grpc = mlxctl_generate(served, models["llama"], "--max-tokens", "24", "--stop", stop)
        assert (via_grpc["text"], via_grpc["finish_reason"]) == (cut, "stop")
        via_http = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, stop=[stop, "\x00"])
        assert (via_http.choices[0].text, via_http.choices[0].finish_reason) == (cut, "stop")
        streamed = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, stop=stop, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == cut

    def test_eight_concurrent_streams_all_complete(self, api: openai.OpenAI, grpc: Client,
                                                   models: dict[str, Path]) -> None:  # fmt: skip
        """Eight clients streaming at once all get their whole, correct text."""
        expected = grpc.generate(models["llama"], PROMPT, max_tokens=16).text

        def one(_: int) -> str:
            stream = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=16, stream=True)
            return "".join(c.choices[0].text for c in stream)

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(8))) == [expected] * 8


class TestEmbeddings:
    def test_bert_float_and_base64_equal_infer(self, api: openai.OpenAI, grpc: Client,
                                               models: dict[str, Path]) -> None:  # fmt: skip
        """BERT sentence embeddings over HTTP (float and base64) equal Infer's, in input order."""
        texts = ["a small cat", "the weather today", "x"]
        expected = grpc.infer(models["bert"], texts=texts).text_embeds
        for encoding in ("float", "base64"):
            got = api.embeddings.create(model="tiny-bert", input=texts, encoding_format=encoding)  # type: ignore[arg-type]
            vectors = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding == "base64"  # type: ignore[arg-type]
                       else np.array(d.embedding) for d in got.data]  # fmt: skip
            assert np.abs(np.stack(vectors) - expected).max() <= 1e-5

    def test_clip_texts_and_data_url_images_equal_infer(self, api: openai.OpenAI, grpc: Client,
                                                        models: dict[str, Path]) -> None:  # fmt: skip
        """CLIP embeds texts and base64 data-URL images in one request, each equal to Infer's."""
        from mlxd_daemon.fixtures import golden_images

        buf = io.BytesIO()
        golden_images(1, size=40)[0].save(buf, format="PNG")
        png = buf.getvalue()
        expected = grpc.infer(models["clip"], texts=["a photo"], images=[png])
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        got = api.embeddings.create(model="tiny-clip", input=["a photo", url], encoding_format="float").data
        assert np.abs(np.array(got[0].embedding) - expected.text_embeds[0]).max() <= 1e-5
        assert np.abs(np.array(got[1].embedding) - expected.image_embeds[0]).max() <= 1e-5


class TestErrors:
    def test_wrong_token_is_401(self, api: openai.OpenAI) -> None:
        """A wrong API key is 401 with reason BAD_TOKEN."""
        with pytest.raises(openai.AuthenticationError) as err:
            api.with_options(api_key="wrong").models.list()
        assert err.value.code == "BAD_TOKEN"

    def test_unknown_model_is_404(self, api: openai.OpenAI, models: dict[str, Path]) -> None:
        """An unknown alias, or a path with no model, is 404 with reason MODEL_NOT_FOUND."""
        for model in ("no-such-model", str(models["llama"]) + "-missing"):
            with pytest.raises(openai.NotFoundError) as err:
                api.completions.create(model=model, prompt="hi", max_tokens=2)
            assert err.value.code == "MODEL_NOT_FOUND"

    def test_bad_requests_are_400_with_reason(self, api: openai.OpenAI, models: dict[str, Path]) -> None:
        """Bad fields and the wrong kind of model are 400, carrying the mlxd reason; the daemon keeps serving."""
        with pytest.raises(openai.BadRequestError) as err:
            api.completions.create(model="tiny-llama", prompt="hi", max_tokens=2, top_p=2.0)
        assert (err.value.code, err.value.param) == ("BAD_REQUEST", "top_p")
        with pytest.raises(openai.BadRequestError) as err:
            api.embeddings.create(model="tiny-llama", input="hi")
        assert err.value.code == "USE_GENERATE"
        with pytest.raises(openai.BadRequestError) as err:
            api.completions.create(model="tiny-bert", prompt="hi", max_tokens=2, stream=True)
        assert err.value.code == "USE_INFER"
        assert api.completions.create(model="tiny-llama", prompt="hi", max_tokens=2).choices


class TestStreamLifetime:
    def test_client_leaving_mid_stream_cancels_the_generation(self, api: openai.OpenAI, served: DaemonProcess,
                                                              models: dict[str, Path]) -> None:  # fmt: skip
        """Closing a stream after its first chunk cancels the generation in the worker; the next request runs."""
        stream = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=1900, stream=True)
        next(iter(stream))
        stream.close()
        assert api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2  # type: ignore[union-attr]
        cancels = [json.loads(line) for line in served.log.read_text().splitlines() if '"generate_cancelled"' in line]
        assert cancels and cancels[-1]["tokens"] < 1900

    def test_worker_crash_mid_stream_is_an_error_event(self, api: openai.OpenAI, served: DaemonProcess,
                                                       models: dict[str, Path]) -> None:  # fmt: skip
        """A models worker killed mid-stream ends the stream with WORKER_CRASHED; the next request is served."""
        from helpers import worker_pid

        stream = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=1900, stream=True)
        pid = worker_pid(served, "models")
        with pytest.raises(openai.APIError) as err:
            for i, _ in enumerate(stream):
                if i == 0:  # chunks already in flight may still arrive before the error event
                    os.kill(pid, signal.SIGKILL)
        assert err.value.code == "WORKER_CRASHED"
        assert api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2).choices[0].text


class TestQueueFull:
    def test_generations_past_the_limit_get_429_with_retry_after(self, api: openai.OpenAI, grpc: Client,
                                                                 models: dict[str, Path]) -> None:  # fmt: skip
        """While the worker is busy, requests wait up to --max-generations (both fronts); the next gets 429."""
        holder = grpc.generate_events(models["llama"], PROMPT, max_tokens=1900)
        next(iter(holder))  # the worker is on this one now; it counts against the limit
        rejected: list[openai.RateLimitError] = []

        def probe() -> None:
            try:
                api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=1)
            except openai.RateLimitError as e:
                rejected.append(e)

        with ThreadPoolExecutor(MAX_GENERATIONS + 4) as pool:
            probes = []
            while not rejected and len(probes) < MAX_GENERATIONS + 4:
                probes.append(pool.submit(probe))
                time.sleep(0.02)  # well inside the holder's 1900 tokens
            time.sleep(0.2)  # a probe still in flight meets the full queue too
            holder.close()  # the waiting ones now run, one token each
            for p in probes:
                p.result(timeout=120)
        assert rejected and rejected[0].code == "QUEUE_FULL"
        assert rejected[0].response.headers["retry-after"] == "1"
        assert len(probes) - len(rejected) == MAX_GENERATIONS - 1  # the holder took one place


class TestHttpStatus:
    def test_error_codes_map_to_http_statuses(self) -> None:
        """Queue full is 429 with Retry-After; a crashed worker 503; bodies are OpenAI error JSON with the reason."""
        from mlxd_daemon.errors import ResourceExhausted, WorkerCrashed
        from mlxd_daemon.http_front import error_response

        full = error_response(ResourceExhausted("queued", reason="QUEUE_FULL", retry_after_s=5))
        assert (full.status_code, full.headers["retry-after"]) == (429, "5")
        crashed = error_response(WorkerCrashed("died", exit_code=-9))
        assert crashed.status_code == 503
        body = json.loads(bytes(crashed.body))["error"]
        assert (body["code"], body["mlxd"]["metadata"]["exit_code"]) == ("WORKER_CRASHED", "-9")


class TestHttpServer:
    def test_connections_send_small_chunks_at_once(self) -> None:
        """Accepted connections have TCP_NODELAY: a streamed chunk is not held back for the client's delayed ACK."""
        from mlxd_daemon.http_front import HttpServer
        from starlette.applications import Starlette

        server = HttpServer(Starlette(), "127.0.0.1", 0)
        server.start()
        try:
            host, port = server.address.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.recv(65536).startswith(b"HTTP/1.1 404")  # the connection stays open (keep-alive)
                (connection,) = server.server.server_state.connections
                accepted = connection.transport.get_extra_info("socket")
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            server.stop()
        assert not server.thread.is_alive()
