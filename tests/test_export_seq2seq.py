"""Exported encoder-decoders: encoder once, decoder step by step; greedy Generate equals transformers' generate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zoo
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client import Client
from mlxd_client.errors import MlxdClientError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module", params=["bart", "t5"])
def seq2seq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HF directory with a tokenizer, its exported program)."""
    from mlxd_daemon.export import export_program

    entry = next(e for e in zoo.ZOO if e.name == request.param)
    root = tmp_path_factory.mktemp(entry.name)
    src = zoo.build(entry, root)
    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} if entry.name == "bart" else {
        "<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}  # fmt: skip
    zoo.save_tokenizer(src, specials)
    export_program(src, root / "mlx")
    return src, root / "mlx"


def hf_greedy(src: Path, prompt: str, n: int) -> list[int]:
    import torch
    import transformers
    from tokenizers import Tokenizer

    ids = torch.tensor([Tokenizer.from_file(str(src / "tokenizer.json")).encode(prompt).ids])
    cls = getattr(transformers, json.loads((src / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, num_beams=1)
    return out[0, 1:].tolist()  # without the decoder start token


class TestSeq2Seq:
    def test_program_has_encoder_and_decoder_graphs(self, seq2seq: tuple[Path, Path]) -> None:
        """The program holds two graphs sharing one weight file, with symbolic batch and lengths."""
        spec = json.loads((seq2seq[1] / "program.json").read_text())
        assert (spec["kind"], sorted(spec["graphs"])) == ("seq2seq", ["decoder", "encoder"])
        assert {"batch", "seq", "decoder_seq"} <= set(spec["dims"])
        assert spec["graphs"]["decoder"]["inputs"][0]["shape"] == ["batch", "decoder_seq"]

    def test_greedy_tokens_equal_transformers(self, seq2seq: tuple[Path, Path]) -> None:
        """Greedy generation (encoder once, decoder per step) yields transformers' generate tokens."""
        from mlxd_daemon.archs import mlxd_program

        src, mlx = seq2seq
        bundle = mlxd_program.load(mlx)
        events = list(bundle.generate("w5 w17 w42 w8 w63", max_tokens=10))
        assert [e["token_id"] for e in events] == hf_greedy(src, "w5 w17 w42 w8 w63", 10)
        assert events[-1]["finish_reason"] in ("stop", "length")

    def test_validates_logits_through_the_daemon(self, client: Client, seq2seq: tuple[Path, Path]) -> None:
        """Validate compares logits and encoder states with transformers at two shapes; all within the band."""
        src, mlx = seq2seq
        report = client.validate(mlx, src)
        assert report.passed, [o for o in report.outputs if not o.passed]
        assert {o.name for o in report.outputs} >= {"logits", "logits@random", "encoder_last_hidden_state"}

    def test_generate_streams_through_the_daemon(self, client: Client, seq2seq: tuple[Path, Path]) -> None:
        """Generate streams greedy tokens equal to transformers'; sampling with a seed is reproducible."""
        src, mlx = seq2seq
        events = list(client.generate_events(mlx, "w9 w10 w11", max_tokens=8))
        tokens = [e.token_id for e in events if isinstance(e, pb.GeneratedToken)]
        assert tokens == hf_greedy(src, "w9 w10 w11", 8)
        result = events[-1]
        assert isinstance(result, pb.GenerateResult) and result.finish_reason in ("stop", "length")
        sampled = [client.generate(mlx, "w9 w10 w11", max_tokens=8, temperature=1.0, top_p=0.9, seed=s).text
                   for s in (1, 1)]  # fmt: skip
        assert sampled[0] == sampled[1]


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Whisper-tiny-shaped random model (16 mel bins, 1 s window) with its feature extractor, and its program."""
    from mlxd_daemon.export import export_program

    root = tmp_path_factory.mktemp("whisper")
    src = zoo.build(next(e for e in zoo.ZOO if e.name == "whisper"), root)
    export_program(src, root / "mlx")
    return src, root / "mlx"


def speech(seconds: float = 0.8) -> np.ndarray:
    """A deterministic chirp with noise, 16 kHz float PCM in [-1, 1]."""
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(0)
    return (0.5 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def hf_transcribe(src: Path, pcm: np.ndarray, n: int) -> list[int]:
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    features = WhisperFeatureExtractor.from_pretrained(src)(pcm, sampling_rate=16000, return_tensors="pt")
    model = WhisperForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(features.input_features, max_new_tokens=n, do_sample=False, num_beams=1)
    return [t for t in out[0].tolist() if t != model.generation_config.decoder_start_token_id]


class TestWhisper:
    def test_audio_in_greedy_tokens_equal_transformers(self, client: Client, whisper: tuple[Path, Path]) -> None:
        """16 kHz PCM through Run: the greedy transcript tokens equal transformers' generate."""
        src, mlx = whisper
        pcm = speech()
        tokens = client.run(mlx, {"audio": pcm})["tokens"].tolist()
        assert tokens[:20] == hf_transcribe(src, pcm, 20)[:20]

    def test_wav_file_in(self, client: Client, whisper: tuple[Path, Path], tmp_path: Path) -> None:
        """A 16-bit WAV file's bytes give the transcript of its samples; another rate is BAD_AUDIO."""
        import wave

        pcm16 = (speech() * 32767).astype("<i2")
        for rate in (16000, 8000):
            with wave.open(str(tmp_path / f"{rate}.wav"), "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
                w.writeframes(pcm16.tobytes())
        data = np.frombuffer((tmp_path / "16000.wav").read_bytes(), np.uint8)
        tokens = client.run(mlx := whisper[1], {"wav": data})["tokens"].tolist()
        assert tokens == client.run(mlx, {"audio": pcm16.astype(np.float32) / 32768})["tokens"].tolist()
        with pytest.raises(MlxdClientError) as e:
            client.run(mlx, {"wav": np.frombuffer((tmp_path / "8000.wav").read_bytes(), np.uint8)})
        assert e.value.reason == "BAD_AUDIO"

    def test_validation_compares_logits(self, client: Client, whisper: tuple[Path, Path]) -> None:
        """Validate compares decoder logits (and encoder states) with transformers, at two batch sizes."""
        report = client.validate(whisper[1], whisper[0])
        assert report.passed and {"logits", "logits@random"} <= {o.name for o in report.outputs}
