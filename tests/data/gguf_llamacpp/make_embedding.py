"""Rebuild the EmbeddingGemma files in this folder: a tiny random EmbeddingGemma-shaped
sentence-transformers directory (laid out as google/embeddinggemma-300m is: the Transformer at the
root, then 1_Pooling, 2_Dense, 3_Dense, 4_Normalize), turned into a ``gemma-embedding`` GGUF by
llama.cpp's own converter (``--sentence-transformers-dense-modules``), a Q8_0 copy made by
llama.cpp's quantiser, and the references tests/test_embedding_gguf.py compares gemmakit with:
sentence-transformers' ``encode`` on the directory and llama.cpp's embeddings on both files.

    PYTHONPATH=llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py \\
        python tests/data/gguf_llamacpp/make_embedding.py llama_cpp_python-0.3.36/vendor/llama.cpp

Needs transformers >= 5.5, sentence-transformers, sentencepiece and llama-cpp-python 0.3.36 (see
make.py). The tokenizer is make.py's 384-piece one with Gemma 3's piece names, put around each text
as EmbeddingGemma's is (``<bos>`` text ``<eos>``); the converter reads its tokenizer.model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from make import HERE, tokenizer

NAME = "embeddinggemma-tiny"
WINDOW = 8  # even: transformers saves a bidirectional config's window as 2 * (W // 2)
# EmbeddingGemma's task prompts, as its config_sentence_transformers.json has them (a subset)
PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}
# every one longer than the window of 8 tokens (the 384-piece vocabulary splits words into several)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma models are small and fast; llama.cpp converts transformers checkpoints into GGUF files.",
    "Hello world! 0123456789 (brackets) [and] {braces} <angles> -_=+*/",
    "Le renard brun saute par-dessus le chien paresseux.",
]


def directory(destination: Path, seed: int = 11) -> Path:
    """The sentence-transformers directory, written by transformers and sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from transformers import Gemma3TextConfig, Gemma3TextModel, GemmaTokenizer

    hf = destination.with_name(destination.name + "-transformer")
    hf.mkdir(parents=True)
    vocab = tokenizer(hf, gemma3=True)
    GemmaTokenizer.from_pretrained(hf, add_bos_token=True, add_eos_token=True).save_pretrained(hf)
    # EmbeddingGemma's shape, scaled down: 5 sliding : 1 global layers (a 7th makes the pattern
    # wrap), queries scaled by head_dim (llama.cpp's gemma-embedding hard-codes 1/sqrt(head_dim))
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
        max_position_embeddings=256, use_bidirectional_attention=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    model = Gemma3TextModel(config).eval()
    # weights as small as a trained model's (norm scales 1 + w near 1): make.py's larger ones make a
    # chaotic model, whose Q8_0 copy llama.cpp and gemmakit would each amplify differently
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(torch.randn(t.shape, generator=g) * (0.2 if "norm" in name else 0.05))
    model.config.architectures = ["Gemma3TextModel"]
    model.save_pretrained(hf)
    modules = [Transformer(str(hf), max_seq_length=256), Pooling(64, "mean")]
    for i, (n_in, n_out) in enumerate(((64, 256), (256, 64))):  # EmbeddingGemma's: bias-free, Identity
        layer = Dense(n_in, n_out, bias=False, activation_function=torch.nn.Identity())
        with torch.no_grad():
            layer.linear.weight.copy_(torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed + i))
                                      * n_in**-0.5)
        modules.append(layer)
    modules.append(Normalize())
    SentenceTransformer(modules=modules, prompts=PROMPTS, device="cpu").save(str(destination))
    # transformers 5 saves tokenizer.json only; the hub directory also carries tokenizer.model,
    # which the converter reads (as a SentencePiece vocabulary, Gemma's)
    (destination / "tokenizer.model").write_bytes((hf / "tokenizer.model").read_bytes())
    return destination


def llama_cpp_embeddings(path: Path, texts: list[str]) -> list[list[float]]:
    """llama.cpp's embeddings: the file's own pooling (mean), its dense layers, then L2-normalised."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=256, n_batch=256, n_ubatch=256,
                          n_threads=2, verbose=False)
    return [[round(float(x), 6) for x in row] for row in llm.embed(texts, normalize=True)]


def main(llama_cpp_dir: str) -> None:
    import llama_cpp
    from sentence_transformers import SentenceTransformer

    f32, q8 = HERE / f"{NAME}.gguf", HERE / f"{NAME}-q8_0.gguf"
    reference: dict = {"texts": TEXTS, "prompts": PROMPTS}
    with tempfile.TemporaryDirectory() as tmp:
        st_dir = directory(Path(tmp) / NAME)
        subprocess.run([sys.executable, f"{llama_cpp_dir}/convert_hf_to_gguf.py", str(st_dir), "--outfile", str(f32),
                        "--outtype", "f32", "--sentence-transformers-dense-modules"], check=True)
        st = SentenceTransformer(str(st_dir), device="cpu")
        for prompt in (None, *PROMPTS):
            key = prompt or "none"
            reference[f"sentence_transformers_{key}"] = st.encode(TEXTS, prompt_name=prompt).round(6).tolist()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(q8).encode(), params) != 0:
        raise SystemExit("llama_model_quantize failed")
    for path, key in ((f32, "f32"), (q8, "q8_0")):
        for prompt in (None, *PROMPTS):
            texts = [PROMPTS.get(prompt, "") + t for t in TEXTS]
            reference[f"llama_cpp_{key}_{prompt or 'none'}"] = llama_cpp_embeddings(path, texts)
    (HERE / f"{NAME}.json").write_text(json.dumps(reference) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
