"""Random-weight EmbeddingGemma-shaped models, written as sentence-transformers saves them.

Nothing is mocked: transformers builds a Gemma 3 text model in bidirectional mode with random
weights, sentence-transformers puts its own Pooling, Dense and Normalize modules after it and
saves the whole pipeline, and gemmakit reads the directory it wrote. The tokenizer is the real
Gemma 3 one (262144 pieces, EmbeddingGemma's vocabulary), taken from the default model's GGUF
and made into Hugging Face files by transformers, with ``<bos>`` and ``<eos>`` around each text
as EmbeddingGemma's tokenizer has them.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Texts in several scripts, one of them longer than the models' sliding window (16 here).
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Le renard brun saute par-dessus le chien paresseux, puis il repart vers la forêt.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "素早い茶色の狐がのろまな犬を飛び越えた。",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "short",
    "A retrieval model reads the whole text at once: " + "every token sees its neighbours on both sides, " * 12,
]


def hf_tokenizer_directory(gguf_path: Path, destination: Path) -> Path:
    """The real Gemma tokenizer as Hugging Face files (tokenizer.json and its config), adding
    ``<bos>`` before and ``<eos>`` after a text and padding on the right."""
    from transformers import AutoTokenizer

    from gemmakit.checkpoints.gguf_reader import open_gguf
    from gemmakit.tokenizer import Tokenizer

    Tokenizer.from_gguf(open_gguf(gguf_path)).save_pretrained(destination / "spm")
    tokenizer = AutoTokenizer.from_pretrained(destination / "spm", add_bos_token=True, add_eos_token=True)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(destination / "hf")
    return destination / "hf"


def embedding_gemma_directory(destination: Path, tokenizer_dir: Path, *, pooling="mean", include_prompt=True,
                              dense=((64, 256, False, "Identity"), (256, 64, False, "Identity")),
                              normalize=True, max_seq_length=256, seed=0, weight_std=0.05, **shape) -> Path:
    """An EmbeddingGemma-shaped sentence-transformers directory with random weights: Gemma 3
    layers (5 sliding : 1 global, 4 query heads on 1 KV head, QK-norm) run bidirectionally,
    then Pooling, the Dense layers ``(in, out, bias, activation)`` and Normalize, with
    EmbeddingGemma's task prompts. ``shape`` overrides the Gemma3TextConfig sizes (the
    benchmark's are EmbeddingGemma 300M's)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel

    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16) | shape
    config = Gemma3TextConfig(
        vocab_size=262_144, **sizes, max_position_embeddings=2048, use_bidirectional_attention=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    torch.manual_seed(seed)
    model = Gemma3TextModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else weight_std)
    model.config.architectures = ["Gemma3TextModel"]
    hf_dir = destination.with_name(destination.name + "-transformer")
    model.save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(hf_dir)
    activations = {"Identity": torch.nn.Identity, "Tanh": torch.nn.Tanh, "GELU": torch.nn.GELU}
    modules = [Transformer(str(hf_dir), max_seq_length=max_seq_length),
               Pooling(config.hidden_size, pooling, include_prompt=include_prompt)]
    for i, (n_in, n_out, bias, activation) in enumerate(dense):
        layer = Dense(n_in, n_out, bias=bias, activation_function=activations[activation]())
        with torch.no_grad():  # random biases too, so a missing one shows
            torch.manual_seed(seed + 100 + i)
            layer.linear.weight.normal_(0.0, n_in**-0.5)
            if bias:
                layer.linear.bias.normal_(0.0, 0.1)
        modules.append(layer)
    if normalize:
        modules.append(Normalize())
    prompts = {"query": "task: search result | query: ", "document": "title: none | text: ",
               "classification": "task: classification | query: "}
    SentenceTransformer(modules=modules, prompts=prompts, device="cpu").save(str(destination))
    return destination
