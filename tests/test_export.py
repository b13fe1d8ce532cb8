"""Any PyTorch model -> MLX program (torch.export): coverage models, the format, errors, and the daemon path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlxd_client import Client
from mlxd_client.errors import MlxdClientError
from mlxd_daemon.archs import mlxd_program
from mlxd_daemon.errors import FailedPrecondition, InvalidArgument, Unsupported
from mlxd_daemon.export import export_program, maybe_export
from mlxd_daemon.validate import validate_model
from safetensors import safe_open
from torch import nn

transformers = pytest.importorskip("transformers")
# torch.export.load still builds a deprecated pytree LeafSpec (torch 2.13); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")
ATOL = 1e-4  # float32 on both sides: only summation order differs


# ---- models (module-level so ``test_export:make_mlp`` is an importable entry point) ----------------------


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


class MnistCnn(nn.Module):
    """The seed's "start small": conv-relu-pool twice, then two linear layers, log-softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x.flatten(1)))), dim=-1)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.down(x))


class TinyResNet(nn.Module):
    """ResNet-style: stem conv/bn/relu/maxpool, two residual stages, avg pool, global pool, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        for m in self.modules():  # non-trivial running statistics, so batch norm is really exercised
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.normal_(1, 0.2)
                m.bias.data.normal_(0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.layer2(self.layer1(self.stem(x)))))


def tiny_text(vocab: int = 99) -> dict[str, Any]:
    return {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 37}  # fmt: skip


def text_inputs(vocab: int = 99) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # a padded row
    return {"input_ids": torch.randint(0, vocab, (2, 7), generator=gen), "attention_mask": mask}


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MNIST-style CNN saved with ``torch.export.save``."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "mnist_cnn.pt2"
    torch.export.save(torch.export.export(MnistCnn().eval(), (torch.randn(2, 1, 28, 28),)), str(path))
    return path


@pytest.fixture(scope="module")
def deit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers DeiTForImageClassification directory (no hand-written MLX module for "deit")."""
    torch.manual_seed(0)
    cfg = transformers.DeiTConfig(**{k: v for k, v in tiny_text().items() if k != "vocab_size"}, image_size=32,
                                  patch_size=8, num_labels=5)  # fmt: skip
    path = tmp_path_factory.mktemp("hf") / "deit"
    transformers.DeiTForImageClassification(cfg).save_pretrained(path)
    return path


def sources(name: str, cnn_pt2: Path, deit_dir: Path) -> tuple[Any, dict[str, Any]]:
    """(source, export_program keywords) for each coverage model, one per way of handing a model in."""
    torch.manual_seed(0)
    if name == "mlp":
        return "test_export:make_mlp", {"input_spec": [{"shape": [3, 16], "dtype": "float32"}]}
    if name == "mnist_cnn":
        return cnn_pt2, {}
    if name == "resnet":
        return TinyResNet(), {"example_inputs": (torch.randn(2, 3, 32, 32),)}
    if name == "deit":
        return deit_dir, {}
    if name == "bert":
        model = transformers.BertModel(transformers.BertConfig(**tiny_text(), max_position_embeddings=32))
        return model, {"example_inputs": {**text_inputs(), "token_type_ids": torch.zeros(2, 7, dtype=torch.long)}}
    cfg = transformers.CLIPConfig(
        text_config={**tiny_text(), "max_position_embeddings": 16, "eos_token_id": 2},
        vision_config={**tiny_text(), "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return transformers.CLIPModel(cfg), {"example_inputs": {**text_inputs(), "pixel_values": torch.randn(2, 3, 32, 32)}}


COVERAGE = ("mlp", "mnist_cnn", "resnet", "deit", "bert", "clip")
KEY_OUTPUTS = {"mlp": "output", "mnist_cnn": "output", "resnet": "output", "deit": "logits",
               "bert": "last_hidden_state", "clip": "logits_per_image"}  # fmt: skip


class TestCoverage:
    @pytest.mark.parametrize("name", COVERAGE)
    def test_exported_model_matches_pytorch(self, name: str, cnn_pt2: Path, deit_dir: Path, tmp_path: Path) -> None:
        """Each coverage model exports with every op mapped and matches PyTorch (atol 1e-4) on the example
        inputs and on fresh random inputs, through validate_model."""
        source, options = sources(name, cnn_pt2, deit_dir)
        dst = tmp_path / "program"
        result = export_program(source, dst, **options)
        assert (result["ops_mapped"], result["missing_ops"]) == (result["ops_seen"], [])
        assert result["model_type"] == "mlxd_program"
        # The reference: the .pt2 / HF directory it came from, or (module, factory) the program's own source.pt2.
        reference = source if isinstance(source, Path) else dst
        report = validate_model(reference, dst)
        names = {o["name"] for o in report["outputs"]}
        key = KEY_OUTPUTS[name]
        assert {key, f"{key}@random"} <= names
        assert report["passed"], report["outputs"]
        assert max(o["max_abs"] for o in report["outputs"]) < ATOL
        print(f"\n{name}: ops {result['ops_mapped']}/{result['ops_seen']} mapped")


class TestFormat:
    def test_program_directory_layout(self, cnn_pt2: Path, tmp_path: Path) -> None:
        """The directory holds the versioned program, config, manifest, weights and example inputs."""
        dst = tmp_path / "cnn"
        export_program(cnn_pt2, dst)
        spec = json.loads((dst / "program.json").read_text())
        assert (spec["format"], spec["version"]) == ("mlxd.program", 2)
        assert spec["inputs"] == [{"name": "x", "shape": [2, 1, 28, 28], "dtype": "float32"}]
        assert spec["source"] == {"kind": "pt2", "path": str(cnn_pt2.resolve())}
        assert json.loads((dst / "config.json").read_text())["model_type"] == "mlxd_program"
        manifest = json.loads((dst / "mlxd_manifest.json").read_text())
        assert manifest["layouts"] == {"conv1.weight": "mlx_conv2d_OHWI", "conv2.weight": "mlx_conv2d_OHWI"}
        assert (dst / "example_inputs.safetensors").is_file()

    def test_conv_weights_are_transposed_once_at_export(self, cnn_pt2: Path, tmp_path: Path) -> None:
        """PyTorch conv2d [O, I, kH, kW] is stored as MLX's [O, kH, kW, I]; the layout is in the file metadata."""
        dst = tmp_path / "cnn"
        export_program(cnn_pt2, dst)
        with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
            assert list(f.get_slice("conv2.weight").get_shape()) == [16, 3, 3, 8]
            assert json.loads(f.metadata()["mlxd.layout"])["conv2.weight"] == "mlx_conv2d_OHWI"

    def test_float16_storage(self, tmp_path: Path) -> None:
        """dtype float16 stores float weights in float16; the program still computes in float32."""
        result = export_program("test_export:make_mlp", tmp_path / "p", input_spec=[{"shape": [3, 16]}],
                                dtype="float16")  # fmt: skip
        bundle = mlxd_program.load(tmp_path / "p")
        assert (result["dtype"], bundle.dtype) == ("float16", "float16")

    def test_run_checks_inputs(self, tmp_path: Path) -> None:
        """run() names the expected inputs on a wrong shape; embed() says to use run."""
        export_program("test_export:make_mlp", tmp_path / "p", input_spec=[{"shape": [3, 16]}])
        bundle = mlxd_program.load(tmp_path / "p")
        with pytest.raises(InvalidArgument) as e:
            bundle.run({"input": torch.zeros(4, 16).numpy()})
        assert e.value.reason == "BAD_INPUT_SHAPE"
        with pytest.raises(InvalidArgument) as e:
            bundle.embed(["a text"], [])
        assert e.value.reason == "USE_RUN"


class Cumprod(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(x, 1) + 1


class TestErrors:
    def test_unmapped_op_fails_before_writing(self, tmp_path: Path) -> None:
        """An op without a mapping: UNIMPLEMENTED / UNSUPPORTED_OPS naming it, and nothing is written."""
        with pytest.raises(Unsupported) as e:
            export_program(Cumprod(), tmp_path / "p", example_inputs=(torch.randn(2, 3),))
        assert e.value.code == "UNIMPLEMENTED"
        assert (e.value.reason, e.value.metadata["ops"]) == ("UNSUPPORTED_OPS", "aten.cumprod.default")
        assert list(tmp_path.iterdir()) == []

    def test_output_exists(self, tmp_path: Path) -> None:
        """An existing destination is refused unless overwrite."""
        (tmp_path / "p").mkdir()
        with pytest.raises(FailedPrecondition) as e:
            export_program("test_export:make_mlp", tmp_path / "p", input_spec=[{"shape": [3, 16]}])
        assert e.value.reason == "OUTPUT_EXISTS"
        export_program("test_export:make_mlp", tmp_path / "p", input_spec=[{"shape": [3, 16]}], overwrite=True)
        assert (tmp_path / "p" / "program.json").is_file()

    def test_routing(self, cnn_pt2: Path, deit_dir: Path, tiny_clip: Path) -> None:
        """Convert routes .pt2 files and HF model_types without a hand-written module to export."""
        assert (maybe_export(cnn_pt2), maybe_export(deit_dir), maybe_export(tiny_clip)) == (True, True, False)


class TestDaemon:
    @pytest.mark.parametrize("name", ["resnet", "deit", "bert", "clip"])
    def test_coverage_models_through_the_daemon(self, client: Client, name: str, cnn_pt2: Path, deit_dir: Path,
                                                tmp_path: Path) -> None:  # fmt: skip
        """The coverage models convert (from a .pt2, or DeiT from its HF directory) and validate over gRPC."""
        source, options = sources(name, cnn_pt2, deit_dir)
        if not isinstance(source, Path):  # an nn.Module: hand it in the way users do, as a torch.export .pt2
            example = options["example_inputs"]
            args, kwargs = (example, {}) if isinstance(example, tuple) else ((), example)
            exported = torch.export.export(source.eval(), args, kwargs)
            source = tmp_path / f"{name}.pt2"
            torch.export.save(exported, str(source))
        dst = tmp_path / "mlx"
        result = client.convert(source, dst)
        assert result.model_type == "mlxd_program" and result.num_tensors > 0
        report = client.validate(dst, source)
        assert report.passed, [o for o in report.outputs if not o.passed]

    def test_convert_validate_pt2(self, client: Client, cnn_pt2: Path, tmp_path: Path) -> None:
        """Convert on a .pt2 writes a program; Validate compares it with the .pt2; Infer asks for named arrays."""
        dst = tmp_path / "cnn-mlx"
        result = client.convert(cnn_pt2, dst)
        assert (result.model_type, result.num_tensors) == ("mlxd_program", 8)
        report = client.validate(dst, cnn_pt2)
        assert report.passed
        assert {o.name for o in report.outputs} == {"output", "output@random"}
        with pytest.raises(MlxdClientError) as e:
            client.infer(dst, texts=["a text"])
        assert e.value.reason == "USE_RUN"
        # Named tensors in, named tensors out, equal to the exported PyTorch program.
        x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
        input_name = json.loads((dst / "program.json").read_text())["inputs"][0]["name"]
        outputs = client.run(dst, {input_name: x})
        expected = torch.export.load(str(cnn_pt2)).module()(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(outputs["output"], expected, atol=1e-4)
        # The program's Linear weights go through the same Quantize path; the q8 program still runs close.
        q8 = client.quantize(dst, tmp_path / "cnn-q8", bits=8, group_size=32)
        assert q8.quantized_layers and q8.model_type == "mlxd_program"
        np.testing.assert_allclose(client.run(tmp_path / "cnn-q8", {input_name: x})["output"], expected, atol=0.1)
