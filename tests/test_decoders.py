"""Every decoder mlx-lm runs, through the real daemon: tiny random models saved by transformers 5 (a BPE
tokenizer each) → Convert → mlx_lm.load reads the output unchanged and agrees with transformers → Validate
passes (per-layer taps paired with HF module paths, MoE routing) → Generate streams transformers' greedy tokens.

All architectures convert/validate/generate in float32 through the daemon; float16 and q4 run on a dense and
two MoE subsets (DTYPE_SUBSET) to keep the module near two minutes on two cores.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client import Client
from mlxd_client.errors import InvalidArgumentError, UnsupportedError
from mlxd_daemon.fixtures.decoders import MOE_TYPES, TINY, make_decoder
from mlxd_daemon.golden import GOLDEN_PROMPTS

ARCHS = sorted(TINY)
DTYPE_SUBSET = ("deepseek_v3", "gemma2", "gpt2", "mixtral", "qwen2_moe")
GREEDY = 8


@pytest.fixture(scope="module")
def zoo(daemon: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """{(arch, "hf"|"float32"|"float16"|"q4"): directory}: sources built, then converted through the daemon."""
    root = tmp_path_factory.mktemp("zoo")
    dirs: dict[tuple[str, str], Path] = {}
    with Client(daemon.address, autostart=False) as c:
        for arch in ARCHS:
            src = dirs[arch, "hf"] = make_decoder(root / arch / "hf", arch)
            result = c.convert(src, root / arch / "float32", dtype="float32")
            assert (result.path, result.model_type) == ("mlx_lm", arch)
            dirs[arch, "float32"] = root / arch / "float32"
            if arch in DTYPE_SUBSET:
                c.convert(src, root / arch / "float16", dtype="float16")
                c.convert(src, root / arch / "q4", dtype="float32", q_bits=4, q_group_size=32)
                dirs[arch, "float16"], dirs[arch, "q4"] = root / arch / "float16", root / arch / "q4"
    return dirs


@functools.cache
def hf(src: Path) -> Any:
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()


def golden_rows(src: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    return [tok.encode(t).ids for t in GOLDEN_PROMPTS]


def hf_greedy(src: Path, prompt: list[int], n: int) -> list[int]:
    """Pure argmax continuation (no logits processors) with transformers."""
    import torch

    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, hf(src)(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq[0, len(prompt) :].tolist()


def teacher_forced_top1(src: Path, model: Any) -> float:
    """Fraction of golden positions where mlx-lm's and transformers' next-token argmax agree."""
    import mlx.core as mx
    import torch

    same = total = 0
    for row in golden_rows(src):
        ours = np.array(model(mx.array([row])).astype(mx.float32))[0].argmax(-1)
        with torch.no_grad():
            ref = hf(src)(input_ids=torch.tensor([row])).logits[0].argmax(-1).numpy()
        same, total = same + int((ours == ref).sum()), total + len(row)
    return same / total


class TestConvert:
    @pytest.mark.parametrize("arch", ARCHS)
    def test_mlx_lm_loads_output_unchanged_and_agrees(self, zoo: dict, arch: str) -> None:
        """mlx_lm.load reads the float32 output as written; teacher-forced top-1 agrees with transformers."""
        import mlx_lm

        model, _ = mlx_lm.load(str(zoo[arch, "float32"]))
        assert teacher_forced_top1(zoo[arch, "hf"], model) >= 0.95

    @pytest.mark.parametrize("arch", DTYPE_SUBSET)
    def test_float16_and_q4_load_in_mlx_lm(self, zoo: dict, arch: str) -> None:
        """fp16 and q4 outputs load in mlx-lm; MoE experts are QuantizedSwitchLinear at 4 bits; fp16 agrees."""
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear

        half, _ = mlx_lm.load(str(zoo[arch, "float16"]))
        half.set_dtype(mx.float32)  # MLX's CPU gather_mm is float32-only; mlxd's CPU policy computes in float32
        assert teacher_forced_top1(zoo[arch, "hf"], half) >= 0.9
        q4, _ = mlx_lm.load(str(zoo[arch, "q4"]))
        switch = [m for _, m in q4.named_modules() if isinstance(m, QuantizedSwitchLinear)]
        assert bool(switch) == (arch in MOE_TYPES) and all(m.bits == 4 for m in switch)
        assert np.isfinite(np.array(q4(mx.array([golden_rows(zoo[arch, "hf"])[0]])))).all()

    def test_moe_experts_are_stacked_as_mlx_lm_expects(self, zoo: dict) -> None:
        """Mixtral's per-expert w1/w2/w3 become switch_mlp.{gate,down,up}_proj [E, out, in]; nothing per-expert."""
        from safetensors import safe_open

        with safe_open(str(zoo["mixtral", "float32"] / "model.safetensors"), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        assert shapes["model.layers.1.block_sparse_moe.switch_mlp.gate_proj.weight"] == (4, 128, 64)
        assert shapes["model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight"] == (4, 64, 128)
        assert not [k for k in shapes if ".experts." in k]

    def test_config_has_the_keys_mlx_lm_reads_and_keeps_the_source_fields(self, zoo: dict) -> None:
        """transformers-5 configs gain n_ctx (gpt2), rotary_emb_base/rotary_pct (gpt_neox), rope_theta at the
        top level (qwen2_moe, where mlx-lm's default would be 1e6); every source field is still there."""
        for arch, want in (("gpt2", {"n_ctx": 256}), ("gpt_neox", {"rotary_emb_base": 10000.0, "rotary_pct": 0.5}),
                           ("qwen2_moe", {"rope_theta": 10000.0})):  # fmt: skip
            src = json.loads((zoo[arch, "hf"] / "config.json").read_text())
            out = json.loads((zoo[arch, "float32"] / "config.json").read_text())
            assert {k: out[k] for k in want} == want and all(out[k] == v for k, v in src.items())

    def test_fused_transformers5_experts_are_read(self, zoo: dict, tmp_path: Path, client: Client) -> None:
        """A checkpoint holding fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) converts to the
        same tensors as the per-expert one."""
        import torch
        from safetensors.torch import load_file, save_file

        src = tmp_path / "fused"
        shutil.copytree(zoo["mixtral", "hf"], src)
        tensors = load_file(str(src / "model.safetensors"))
        for layer in range(2):
            p = f"model.layers.{layer}.block_sparse_moe.experts"
            ex = [{w: tensors.pop(f"{p}.{e}.{w}.weight") for w in ("w1", "w2", "w3")} for e in range(4)]
            q = f"model.layers.{layer}.mlp.experts"
            tensors[f"{q}.gate_up_proj"] = torch.stack([torch.cat([x["w1"], x["w3"]]) for x in ex])
            tensors[f"{q}.down_proj"] = torch.stack([x["w2"] for x in ex])
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
        client.convert(src, tmp_path / "out", dtype="float32")
        a, b = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(zoo["mixtral", "float32"] /
                                                                                   "model.safetensors"))  # fmt: skip
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TestValidate:
    @pytest.mark.parametrize("arch", ARCHS)
    def test_passes_with_layers_paired_to_hf_modules(self, zoo: dict, client: Client, arch: str) -> None:
        """Validate passes through the daemon; every layer (and MoE router) is paired with its HF module path;
        top-1 and greedy agree; MoE routing agrees."""
        report = client.validate(zoo[arch, "float32"], zoo[arch, "hf"])
        assert report.passed and report.first_divergent_layer == "", report
        names = [layer.name for layer in report.layers]
        prefix = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}.get(arch, "model.layers")
        assert f"{prefix}.0" in names and f"{prefix}.1" in names and all(layer.passed for layer in report.layers)
        assert report.agreement["top1_agreement"] >= 0.95 and report.agreement["greedy_exact"] == 1.0
        if arch in MOE_TYPES:
            assert report.agreement["routing_agreement"] == 1.0
            assert any(k.startswith("routing:model.layers.1.mlp.gate") for k in report.agreement)

    @pytest.mark.parametrize("arch", ["mixtral", "gpt2"])
    def test_quantized_band_and_routing_reported(self, zoo: dict, client: Client, arch: str) -> None:
        """A q4 model validates in the q4 band; the agreement (and MoE routing) is measured, not assumed."""
        report = client.validate(zoo[arch, "q4"], zoo[arch, "hf"])
        assert report.band == "q4" and 0.0 < report.agreement["top5_agreement"] <= 1.0
        assert ("routing_agreement" in report.agreement) == (arch in MOE_TYPES)

    def test_source_without_tokenizer_uses_vocabulary_ids(self, zoo: dict, client: Client, tmp_path: Path) -> None:
        """No tokenizer files: golden ids are drawn from the vocabulary (said in the report), and it passes."""
        src, mlx = tmp_path / "src", tmp_path / "mlx"
        for original, copy in ((zoo["qwen3", "hf"], src), (zoo["qwen3", "float32"], mlx)):
            shutil.copytree(original, copy)
            for f in copy.glob("tokenizer*"):
                f.unlink()
        report = client.validate(mlx, src)
        assert report.passed and "vocabulary" in report.inputs_note and report.num_texts == 4


class TestGenerate:
    @pytest.mark.parametrize("arch", ARCHS)
    def test_streams_transformers_greedy_tokens(self, zoo: dict, client: Client, arch: str) -> None:
        """Greedy tokens streamed by the daemon equal transformers' argmax continuation (up to a stop token)."""
        src = zoo[arch, "hf"]
        events = list(client.generate_events(zoo[arch, "float32"], GOLDEN_PROMPTS[1], max_tokens=GREEDY))
        got = [e.token_id for e in events if isinstance(e, pb.GeneratedToken)]
        assert isinstance(events[-1], pb.GenerateResult) and got
        assert got == hf_greedy(src, golden_rows(src)[1], GREEDY)[: len(got)]

    def test_models_shows_active_vs_total_parameters(self, zoo: dict, client: Client) -> None:
        """ListModels: a MoE model's active parameters (top-2 of 4 experts) are fewer than its total; dense equal."""
        client.load_model(zoo["mixtral", "float32"])
        client.load_model(zoo["llama", "float32"])
        info = {m.model_type: m for m in client.list_models().models}
        mix, llama = info["mixtral"], info["llama"]
        experts = 2 * 3 * 4 * 128 * 64  # layers x projections x experts x intermediate x hidden
        assert mix.total_parameters - mix.active_parameters == experts // 2
        assert llama.total_parameters == llama.active_parameters > 0


class TestBadInput:
    def test_unknown_model_type_is_unimplemented_before_reading_weights(self, client: Client, tmp_path: Path) -> None:
        """An unknown model_type is UNIMPLEMENTED naming it and the closest types; the (garbage) weights are never
        read and nothing is written."""
        src = tmp_path / "src"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "mixtrall"}))
        (src / "model.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(UnsupportedError) as e:
            client.convert(src, tmp_path / "out")
        assert e.value.reason == "UNSUPPORTED_ARCHITECTURE" and "'mixtrall'" in e.value.message
        assert "mixtral" in e.value.message and not (tmp_path / "out").exists()

    def test_expert_count_mismatch_names_the_layer(self, zoo: dict, client: Client, tmp_path: Path) -> None:
        """A layer missing an expert is INVALID_ARGUMENT naming that layer; nothing is left at the destination."""
        from safetensors.torch import load_file, save_file

        src = tmp_path / "src"
        shutil.copytree(zoo["mixtral", "hf"], src)
        tensors = load_file(str(src / "model.safetensors"))
        tensors = {k: v for k, v in tensors.items() if ".layers.1.block_sparse_moe.experts.3." not in k}
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(InvalidArgumentError) as e:
            client.convert(src, tmp_path / "out")
        assert e.value.reason == "EXPERT_COUNT_MISMATCH" and "model.layers.1" in e.value.message
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.mlxd-tmp-*"))

    def test_capabilities_list_what_is_installed(self, client: Client) -> None:
        """Initialize lists mlxd's own archs and mlx-lm's model types (and its aliases)."""
        archs = set(client.initialize().capabilities.architectures)
        assert {"bert", "clip", "vit", "gpt2", "mixtral", "qwen2_moe", "mistral", "deepseek_v3"} <= archs
        assert "llama_generate" not in archs and "decoder" not in archs


class TestRegistry:
    def test_derived_from_what_is_installed(self) -> None:
        """mlxd's modules are found by file, mlx-lm's types by its models folder; no helper module is an arch."""
        import mlx_lm
        from mlxd_daemon import archs

        models = Path(mlx_lm.__file__).parent / "models"
        assert set(archs.mlx_lm_types()) <= {p.stem for p in models.glob("*.py")}
        assert {"mixtral", "gpt2", "deepseek_v3"} <= set(archs.mlx_lm_types())
        assert "switch_layers" not in archs.mlx_lm_types() and "cache" not in archs.mlx_lm_types()
        assert set(archs.mlxd_types()) == {"bert", "clip", "mlxd_program", "vit"}

    def test_every_module_satisfies_the_contract(self) -> None:
        """Each registered mlxd module, and the mlx-lm decoder module, is an ``ArchModule``."""
        from mlxd_daemon import archs
        from mlxd_daemon.archs.contract import ArchModule

        for model_type in (*archs.mlxd_types(), "mixtral"):
            assert isinstance(archs.get_arch(model_type), ArchModule), model_type

    def test_routes_are_explicit(self) -> None:
        """mlxd's own module first, then mlx-lm (after its aliases), then torch.export for transformers-only
        types; anything else is UNSUPPORTED_ARCHITECTURE with the closest names."""
        from mlxd_daemon import archs
        from mlxd_daemon.errors import Unsupported

        assert archs.resolve("clip").path == "mlxd:clip"
        assert (archs.resolve("mistral").path, archs.resolve("mistral").mlx_lm_type) == ("mlx_lm", "llama")
        assert archs.resolve("resnet").path == "export"
        with pytest.raises(Unsupported) as e:
            archs.resolve("qwen9_moe")
        assert e.value.reason == "UNSUPPORTED_ARCHITECTURE" and "qwen3_moe" in e.value.message
