"""Rebuild the files in this folder: tiny random Gemma 4 checkpoints written by transformers, turned into
GGUF by llama.cpp's own converter, and llama.cpp's logits on them (the independent reference that
tests/test_gemma4_gguf.py compares gemmakit with).

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    PYTHONPATH=llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py \\
        python tests/data/gguf_llamacpp/make.py llama_cpp_python-0.3.36/vendor/llama.cpp

Needs transformers >= 5.5, sentencepiece and llama-cpp-python 0.3.36 (built from source). The
tokenizer is a 384-piece SentencePiece BPE model trained here, converted to tokenizer.json by
transformers, since the gemma4 converter reads tokenizer.json.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
VOCAB = 384
TEXT = ("The quick brown fox jumps over the lazy dog. Hello world! Gemma models are small and fast. "
        "llama.cpp converts transformers checkpoints into GGUF files. 0123456789 ,.;:!?()[]{}<>-_=+*/\\'\"\n")
COMMON = dict(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64, intermediate_size=96,
              num_attention_heads=4, head_dim=16, max_position_embeddings=256, sliding_window=8,
              final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
VARIANTS = {
    # PLE, the last two layers reading shared K/V with a double-wide MLP, global head size 32
    "gemma4-ple-shared-kv": dict(num_hidden_layers=6, num_key_value_heads=1, hidden_size_per_layer_input=16,
                                 layer_types=["sliding_attention"] * 3 + ["full_attention", "sliding_attention",
                                                                          "full_attention"],
                                 num_kv_shared_layers=2, use_double_wide_mlp=True, global_head_dim=32),
    # experts beside the dense MLP, K=V global layers with one KV head
    "gemma4-experts": dict(num_hidden_layers=4, num_key_value_heads=2, hidden_size_per_layer_input=0,
                           layer_types=["sliding_attention"] * 3 + ["full_attention"], attention_k_eq_v=True,
                           global_head_dim=32, num_global_key_value_heads=1, enable_moe_block=True, num_experts=4,
                           top_k_experts=2, moe_intermediate_size=24),
}
IDS = [2] + np.random.RandomState(0).randint(6, VOCAB, size=15).tolist()  # longer than the window of 8


def tokenizer(directory: Path) -> int:
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([TEXT] * 50 + TEXT.split()), model_writer=model, model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<|turn>", "<turn|>"],
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, hard_vocab_limit=False, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    tok = GemmaTokenizer.from_pretrained(directory, mask_token=None)
    tok.save_pretrained(directory)
    return len(tok)


def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g)
                scale_like = "norm" in name or name.endswith(("layer_scalar", "router.scale", "per_expert_scale"))
                t.copy_(1.0 + 0.2 * r if scale_like else 0.15 * r)


def main(llama_cpp_dir: str) -> None:
    import llama_cpp
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    logits = {"ids": IDS}
    for seed, (name, variant) in enumerate(VARIANTS.items()):
        with tempfile.TemporaryDirectory() as tmp:
            hf = Path(tmp) / name
            hf.mkdir()
            vocab = tokenizer(hf)
            config = Gemma4TextConfig(**{**COMMON, "vocab_size": vocab, "vocab_size_per_layer_input": vocab}, **variant)
            model = Gemma4ForCausalLM(config).eval()
            randomise(model, seed)
            model.save_pretrained(hf)
            out = HERE / f"{name}.gguf"
            subprocess.run([sys.executable, f"{llama_cpp_dir}/convert_hf_to_gguf.py", str(hf), "--outfile", str(out),
                            "--outtype", "f32"], check=True)
        llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=64, n_batch=64, verbose=False,
                              n_threads=2, type_k=0, type_v=0)  # float32 K/V: llama.cpp's own noise is enough
        llm.eval(IDS)
        logits[name] = np.asarray(llm.scores[:len(IDS)], dtype=np.float32).round(5).tolist()
    (HERE / "llama_cpp_logits.json").write_text(json.dumps(logits) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
