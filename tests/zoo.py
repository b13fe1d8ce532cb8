"""The model zoo: tiny random transformers models of many architectures, saved the way checkpoints come.

Each entry is built from a config here (random weights, ``save_pretrained``, no tokenizer files unless the
entry needs one to generate); ``tests/test_zoo.py`` converts and validates every one through the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Tiny everywhere: the zoo runs on 2 CPU cores in a few minutes. One layer: capture time grows with the graph, and
# a second identical layer adds no op or shape the first does not have (hand-written archs test depth themselves).
LAYERS = 1
TEXT = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "intermediate_size": 37, "max_position_embeddings": 128}  # fmt: skip
VISION = {"hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "intermediate_size": 37,
          "image_size": 32, "patch_size": 8}  # fmt: skip
SEQ2SEQ = {"vocab_size": 99, "d_model": 32, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
           "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 37, "decoder_ffn_dim": 37,
           "max_position_embeddings": 128,
           "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2}  # fmt: skip
DECODER = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 37, "max_position_embeddings": 128}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One zoo model: its family, the transformers class and config, and a few options."""

    name: str  # the model_type (plus a suffix when one type appears twice)
    family: str  # text, seq2seq, vision, segmentation, audio, dual, decoder
    cls: str  # transformers class name
    config: str  # transformers config class name
    kwargs: dict[str, Any] = field(default_factory=dict)
    processor: dict[str, Any] | None = None  # preprocessor_config.json to save beside the weights


def _text(**extra: Any) -> dict[str, Any]:
    return {**TEXT, **extra}


def _vision(**extra: Any) -> dict[str, Any]:
    return {**VISION, **extra}


ZOO: tuple[Entry, ...] = (
    # text encoders
    Entry("bert", "text", "BertModel", "BertConfig", _text()),
    Entry("roberta", "text", "RobertaModel", "RobertaConfig", _text(pad_token_id=1)),
    Entry("xlm-roberta", "text", "XLMRobertaModel", "XLMRobertaConfig", _text(pad_token_id=1)),
    Entry(
        "distilbert",
        "text",
        "DistilBertModel",
        "DistilBertConfig",
        {"vocab_size": 99, "dim": 32, "n_layers": LAYERS, "n_heads": 4, "hidden_dim": 37},
    ),
    Entry(
        "deberta-v2",
        "text",
        "DebertaV2Model",
        "DebertaV2Config",
        _text(relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"], max_relative_positions=32),
    ),
    Entry("deberta", "text", "DebertaModel", "DebertaConfig", _text()),
    Entry(
        "modernbert",
        "text",
        "ModernBertModel",
        "ModernBertConfig",
        _text(global_attn_every_n_layers=2, local_attention=16, pad_token_id=0),
    ),
    Entry("electra", "text", "ElectraModel", "ElectraConfig", _text(embedding_size=16)),
    Entry("albert", "text", "AlbertModel", "AlbertConfig", _text(embedding_size=16)),
    Entry("mpnet", "text", "MPNetModel", "MPNetConfig", _text()),
    Entry("ernie", "text", "ErnieModel", "ErnieConfig", _text()),
    Entry("bert-classifier", "text", "BertForSequenceClassification", "BertConfig", _text(num_labels=3)),
    # encoder-decoders
    Entry(
        "t5",
        "seq2seq",
        "T5ForConditionalGeneration",
        "T5Config",
        {
            "vocab_size": 99,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 37,
            "num_layers": LAYERS,
            "num_heads": 4,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
    ),
    Entry("bart", "seq2seq", "BartForConditionalGeneration", "BartConfig", dict(SEQ2SEQ)),
    Entry("marian", "seq2seq", "MarianMTModel", "MarianConfig", {**SEQ2SEQ, "decoder_start_token_id": 1}),
    Entry("mbart", "seq2seq", "MBartForConditionalGeneration", "MBartConfig", dict(SEQ2SEQ)),
    Entry(
        "pegasus",
        "seq2seq",
        "PegasusForConditionalGeneration",
        "PegasusConfig",
        {**SEQ2SEQ, "decoder_start_token_id": 1},
    ),
    Entry(
        "whisper",
        "seq2seq",
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        {
            "vocab_size": 99,
            "d_model": 32,
            "encoder_layers": LAYERS,
            "decoder_layers": LAYERS,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 37,
            "decoder_ffn_dim": 37,
            "num_mel_bins": 16,
            "max_source_positions": 50,  # 100 log-mel frames: 1 s of audio
            "max_target_positions": 64,
            "pad_token_id": 1,
            "bos_token_id": 3,
            "eos_token_id": 2,
            "decoder_start_token_id": 3,
            "suppress_tokens": [7],
            "begin_suppress_tokens": [5],
        },
        processor={"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 16, "chunk_length": 1},
    ),
    # vision backbones and classifiers
    Entry("vit", "vision", "ViTModel", "ViTConfig", _vision()),
    Entry("deit", "vision", "DeiTForImageClassification", "DeiTConfig", _vision(num_labels=5)),
    Entry("beit", "vision", "BeitModel", "BeitConfig", _vision(vocab_size=99)),
    Entry("dinov2", "vision", "Dinov2Model", "Dinov2Config", _vision()),
    Entry(
        "convnext",
        "vision",
        "ConvNextModel",
        "ConvNextConfig",
        {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "image_size": 32},
    ),
    Entry(
        "convnextv2",
        "vision",
        "ConvNextV2ForImageClassification",
        "ConvNextV2Config",
        {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "image_size": 32, "num_labels": 5},
    ),
    Entry(
        "resnet",
        "vision",
        "ResNetModel",
        "ResNetConfig",
        {"embedding_size": 8, "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
        processor={"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 32}},
    ),
    Entry(
        "mobilenet_v2", "vision", "MobileNetV2Model", "MobileNetV2Config", {"image_size": 32, "depth_multiplier": 0.25}
    ),
    Entry(
        "swin",
        "vision",
        "SwinModel",
        "SwinConfig",
        {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4},
    ),
    Entry(
        "regnet",
        "vision",
        "RegNetModel",
        "RegNetConfig",
        {"embedding_size": 8, "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "groups_width": 8},
    ),
    Entry(
        "efficientnet",
        "vision",
        "EfficientNetModel",
        "EfficientNetConfig",
        {"image_size": 32, "width_coefficient": 0.25, "depth_coefficient": 0.25, "hidden_dim": 320},
    ),
    Entry(
        "poolformer",
        "vision",
        "PoolFormerModel",
        "PoolFormerConfig",
        {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "num_encoder_blocks": 4},
    ),
    # segmentation
    Entry(
        "segformer",
        "segmentation",
        "SegformerForSemanticSegmentation",
        "SegformerConfig",
        {
            "hidden_sizes": [8, 16, 24, 32],
            "depths": [1, 1, 1, 1],
            "num_attention_heads": [1, 1, 2, 2],
            "decoder_hidden_size": 32,
            "num_labels": 4,
        },
    ),
    # audio
    Entry(
        "wav2vec2",
        "audio",
        "Wav2Vec2Model",
        "Wav2Vec2Config",
        {
            **TEXT,
            "conv_dim": [16, 16],
            "conv_stride": [5, 4],
            "conv_kernel": [10, 4],
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 4,
            "mask_time_prob": 0.0,
        },
    ),
    Entry(
        "hubert",
        "audio",
        "HubertModel",
        "HubertConfig",
        {
            **TEXT,
            "conv_dim": [16, 16],
            "conv_stride": [5, 4],
            "conv_kernel": [10, 4],
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 4,
            "mask_time_prob": 0.0,
        },
    ),
    Entry(
        "wavlm",
        "audio",
        "WavLMModel",
        "WavLMConfig",
        {
            **TEXT,
            "conv_dim": [16, 16],
            "conv_stride": [5, 4],
            "conv_kernel": [10, 4],
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 4,
            "mask_time_prob": 0.0,
            "num_buckets": 16,
            "max_bucket_distance": 32,
        },
    ),
    # dual encoders
    Entry(
        "clip",
        "dual",
        "CLIPModel",
        "CLIPConfig",
        {"text_config": _text(eos_token_id=2), "vision_config": _vision(), "projection_dim": 16},
    ),
    Entry(
        "siglip",
        "dual",
        "SiglipModel",
        "SiglipConfig",
        {
            "text_config": _text(),
            "vision_config": _vision(),
        },
    ),
    # decoders (route to the decoder path: mlx-lm or the hand-written module)
    Entry(
        "gpt2",
        "decoder",
        "GPT2LMHeadModel",
        "GPT2Config",
        {"vocab_size": 99, "n_embd": 32, "n_layer": LAYERS, "n_head": 4, "n_positions": 128},
    ),
    Entry("llama", "decoder", "LlamaForCausalLM", "LlamaConfig", dict(DECODER)),
    Entry("qwen2", "decoder", "Qwen2ForCausalLM", "Qwen2Config", dict(DECODER)),
    Entry(
        "opt",
        "decoder",
        "OPTForCausalLM",
        "OPTConfig",
        {
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "ffn_dim": 37,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": 32,
        },
    ),
)


WORDS = [f"w{i}" for i in range(4, 99)]


def save_tokenizer(model_dir: Path, specials: dict[str, int], template: str = "$A </s>") -> None:
    """A word-level tokenizer over the tiny vocabulary (``w4`` .. ``w98`` are ids 4-98) with ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {**specials, **{w: i for i, w in enumerate(WORDS, start=4)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    marks = [(t, i) for t, i in specials.items() if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=marks)
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(list(specials))
    tok.save(str(model_dir / "tokenizer.json"))


def build(entry: Entry, root: Path, *, seed: int = 0) -> Path:
    """Save ``entry`` tiny and random under ``root/<name>`` (float32 safetensors); returns the directory."""
    import json

    import torch
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, entry.config)(**entry.kwargs)
    model = getattr(transformers, entry.cls)(config).eval()
    with torch.no_grad():  # HF initialises norms to (1, 0) and biases to 0: randomise so swaps show
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.05)
    out = root / entry.name
    model.save_pretrained(out)
    if entry.family == "decoder":  # a causal LM ships its tokenizer: the decoder path tokenizes its prompts
        save_tokenizer(out, {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, template="<s> $A")
    if entry.processor and "feature_extractor_type" in entry.processor:  # built, so every field is there
        options = {k: v for k, v in entry.processor.items() if k != "feature_extractor_type"}
        getattr(transformers, entry.processor["feature_extractor_type"])(**options).save_pretrained(out)
    elif entry.processor:
        (out / "preprocessor_config.json").write_text(json.dumps(entry.processor))
    return out
