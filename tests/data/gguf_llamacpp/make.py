"""Rebuild the files in this folder: tiny random Gemma 4 and Gemma 3n checkpoints written by
transformers, turned into GGUF by llama.cpp's own converter, and llama.cpp's logits on them (the
independent reference that tests/test_gemma4_gguf.py compares gemmakit with) or, for Gemma 3n,
transformers' logits on the checkpoint the file was converted from (tests/test_gemma3n_gguf.py).
``gemma3-vision/`` holds a tiny Gemma 3 vision-language directory as transformers saves it (``hf/``)
and what ``convert_hf_to_gguf.py`` makes of it: the text GGUF and, with ``--mmproj``, the vision
file llama.cpp's tools take with ``--mmproj`` (tests/test_mmproj.py); ``gemma4-vision/`` the same for
a tiny Gemma 4 with its vision encoder.

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    PYTHONPATH=llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py \\
        python tests/data/gguf_llamacpp/make.py llama_cpp_python-0.3.36/vendor/llama.cpp [gemma4] [gemma3n] \
        [gemma3-vision] [gemma4-vision]

Needs transformers >= 5.5, sentencepiece and llama-cpp-python 0.3.36 (built from source). The
tokenizer is a 384-piece SentencePiece BPE model trained here, converted to tokenizer.json by
transformers, since the gemma4 converter reads tokenizer.json (the gemma3n one reads tokenizer.model).
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


def tokenizer(directory: Path, gemma3: bool = False, vision: bool = False) -> int:
    """Train the tokenizer into ``directory``; returns its size. ``gemma3``: Gemma 3's (and 3n's)
    piece names (<pad> <eos> <bos> <unk>) and turn markers, for the gemma3n converter, which reads
    tokenizer.model itself. ``vision``: Gemma 3's image markers too (ids 6, 7, 8)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([TEXT] * 50 + TEXT.split()), model_writer=model, model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=(["<start_of_turn>", "<end_of_turn>"] if gemma3 else ["<|turn>", "<turn|>"])
        + (list(VISION_PIECES) if vision else []),
        **(dict(pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>") if gemma3 else {}),
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, hard_vocab_limit=False, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    tok = GemmaTokenizer.from_pretrained(directory, mask_token=None)
    tok.save_pretrained(directory)
    return len(tok)


VISION_PIECES = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")


def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g)
                scale_like = "norm" in name or name.endswith(("layer_scalar", "router.scale", "per_expert_scale"))
                t.copy_(1.0 + 0.2 * r if scale_like else 0.15 * r)


def gemma4(llama_cpp_dir: str) -> None:
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
        logits[name] = llama_cpp_logits(out, IDS).round(5).tolist()
    (HERE / "llama_cpp_logits.json").write_text(json.dumps(logits) + "\n")


# Gemma 3n as llama.cpp's gemma3n graph can run it: it hard-codes 4 AltUp streams, PLE width 256,
# LAuReL rank 64, keys and values from the first 20 layers (so 22 layers: the last two sliding ones
# read layer 18's), sparsity on exactly the first 10 layers and one MLP width for all layers (its
# loader checks every layer against the first's, though the converter writes one per layer). The PLE
# table (320 rows) is shorter than the vocabulary, as on the published models, so the converter pads
# it with zero rows. Width 32 keeps the file small: the PLE table is most of it.
GEMMA3N = dict(num_hidden_layers=22, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
               intermediate_size=128, vocab_size_per_layer_input=320,
               max_position_embeddings=256, sliding_window=8, final_logit_softcapping=30.0,
               hidden_size_per_layer_input=256, laurel_rank=64, altup_num_inputs=4, num_kv_shared_layers=2,
               activation_sparsity_pattern=[0.95] * 10 + [0.0] * 12, pad_token_id=0, eos_token_id=1, bos_token_id=2)
# within the PLE table (llama.cpp reads the converter's zero rows past it, transformers row 0), and not
GEMMA3N_IDS = [2] + np.random.RandomState(0).randint(6, 320, size=15).tolist()
IDS_BEYOND_PLE = [2] + np.random.RandomState(1).randint(6, VOCAB, size=15).tolist()


def _q8_0_exact(model: torch.nn.Module) -> None:
    """Round every matrix the converter may store as Q8_0 to Q8_0's values, so that the file holds
    exactly the weights transformers computes with (and rounding it again changes nothing)."""
    import gguf

    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() and t.dim() >= 2 and t.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
                t.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)).view(t.shape))


def float32_copy(source: Path, destination: Path) -> None:
    """``source`` with every tensor widened to F32 and its metadata unchanged (gguf-py), so that
    llama.cpp runs the same weights without quantising its activations for Q8_0 products."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(destination, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            kind = field.types[0]
            writer.add_key_value(key, field.contents(), kind,
                                 field.types[1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, values.reshape([int(n) for n in reversed(t.shape)]),
                          raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, verbose=False,
                          n_threads=2, type_k=0, type_v=0)  # float32 K/V
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)], dtype=np.float32)


def gemma3n(llama_cpp_dir: str) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    name = "gemma3n-altup-laurel-ple"
    out = HERE / f"{name}.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / name
        hf.mkdir()
        config = Gemma3nTextConfig(vocab_size=tokenizer(hf, gemma3=True), **GEMMA3N)
        model = Gemma3nForCausalLM(config).eval()
        randomise(model, 7)
        with torch.no_grad():  # AltUp's output scale multiplies like a norm's weight
            for layer in model.model.layers:
                layer.altup.correct_output_scale.add_(1.0)
        _q8_0_exact(model)
        model.save_pretrained(hf)
        with torch.no_grad():
            reference = {"ids": GEMMA3N_IDS, "ids_beyond_ple": IDS_BEYOND_PLE,
                         "transformers": model(torch.tensor([GEMMA3N_IDS])).logits[0].numpy().round(5).tolist(),
                         "transformers_beyond_ple": model(torch.tensor([IDS_BEYOND_PLE])).logits[0].numpy()
                         .round(5).tolist()}
        # transformers 5 gives the layers reading shared keys/values no k/v weights, but llama.cpp's
        # loader wants them on every layer: unused ones, as the hub checkpoints carry
        weights = load_file(hf / "model.safetensors")
        g = torch.Generator().manual_seed(8)
        for i in range(config.num_hidden_layers - config.num_kv_shared_layers, config.num_hidden_layers):
            prefix = f"model.layers.{i}.self_attn."
            weights[prefix + "k_proj.weight"] = 0.15 * torch.randn(config.head_dim, config.hidden_size, generator=g)
            weights[prefix + "v_proj.weight"] = 0.15 * torch.randn(config.head_dim, config.hidden_size, generator=g)
            weights[prefix + "k_norm.weight"] = 1.0 + 0.2 * torch.randn(config.head_dim, generator=g)
        save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
        subprocess.run([sys.executable, f"{llama_cpp_dir}/convert_hf_to_gguf.py", str(hf), "--outfile", str(out),
                        "--outtype", "q8_0"], check=True)
    # llama.cpp's own logits, on the file widened to F32 (Q8_0 products would quantise the
    # activations, which this small, chaotic model amplifies to ~2): they differ from transformers'
    # by ~1.2 through two numeric choices of llama.cpp's, which tests/test_gemma3n_gguf.py reproduces
    with tempfile.TemporaryDirectory() as tmp:
        float32_copy(out, Path(tmp) / "f32.gguf")
        reference["llama_cpp_f32"] = llama_cpp_logits(Path(tmp) / "f32.gguf", GEMMA3N_IDS).round(5).tolist()
    (HERE / "gemma3n_logits.json").write_text(json.dumps(reference) + "\n")


# Gemma 3 with its SigLIP tower: 32 px images in 8 px patches (a 4x4 grid) pooled 2x2 to 4 soft
# tokens, so the converter writes the pooling factor (it omits the published models' 4). A mean and
# std other than the published 0.5 show that they are read from the file, not assumed.
GEMMA3_VISION_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
                          query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh", pad_token_id=0,
                          eos_token_id=1, bos_token_id=2)
GEMMA3_VISION_TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6, vision_use_head=False)
GEMMA3_VISION_PROCESSOR = dict(image_processor_type="Gemma3ImageProcessor", do_resize=True,
                               size={"height": 32, "width": 32}, resample=2, do_rescale=True,
                               rescale_factor=1 / 255, do_normalize=True, image_mean=[0.48, 0.46, 0.41],
                               image_std=[0.27, 0.26, 0.28], do_convert_rgb=True, do_pan_and_scan=False,
                               image_seq_length=4)


def gemma3_vision(llama_cpp_dir: str) -> None:
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              SiglipVisionConfig)

    out = HERE / "gemma3-vision"
    shutil.rmtree(out, ignore_errors=True)
    hf = out / "hf"
    hf.mkdir(parents=True)
    vocab = tokenizer(hf, gemma3=True, vision=True)
    # the specials listed as the published tokenizer_config.json lists them (transformers 5 writes
    # none), which is where the converter learns that they are control tokens and not text
    settings = json.loads((hf / "tokenizer_config.json").read_text())
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *VISION_PIECES]
    settings["added_tokens_decoder"] = {str(i): dict(content=p, lstrip=False, normalized=False, rstrip=False,
                                                     single_word=False, special=True) for i, p in enumerate(pieces)}
    settings.pop("vocab_file", None)  # the path it was saved at
    (hf / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    boi, eoi, soft = (6, 7, 8)  # after <start_of_turn> and <end_of_turn>, the first user-defined ids
    config = Gemma3Config(
        text_config=Gemma3TextConfig(vocab_size=vocab, **GEMMA3_VISION_TEXT).to_dict(),
        vision_config=SiglipVisionConfig(**GEMMA3_VISION_TOWER).to_dict(), mm_tokens_per_image=4,
        boi_token_index=boi, eoi_token_index=eoi, image_token_index=soft)
    model = Gemma3ForConditionalGeneration(config).eval()
    randomise(model, 11)
    with torch.no_grad():  # the converter stores the projector as F16 whatever --outtype says
        model.model.multi_modal_projector.mm_input_projection_weight.copy_(
            model.model.multi_modal_projector.mm_input_projection_weight.half().float())
    model.save_pretrained(hf)
    # in the layout the hub checkpoints were published in, which is the one the converter maps
    # (transformers 5 saves the tower as ``vision_tower.embeddings...``)
    weights = load_file(hf / "model.safetensors")
    save_file({name.replace("vision_tower.", "vision_tower.vision_model.", 1): t for name, t in weights.items()},
              hf / "model.safetensors", metadata={"format": "pt"})
    (hf / "preprocessor_config.json").write_text(json.dumps(GEMMA3_VISION_PROCESSOR, indent=2) + "\n")
    for extra in ("--mmproj",), ():
        subprocess.run([sys.executable, f"{llama_cpp_dir}/convert_hf_to_gguf.py", str(hf), "--outfile",
                        str(out / ("mmproj-gemma3-vision-f32.gguf" if extra else "gemma3-vision-f32.gguf")),
                        "--outtype", "f32", *extra], check=True)
    images = vision_images()
    features = llama_cpp_image_features(out / "gemma3-vision-f32.gguf", out / "mmproj-gemma3-vision-f32.gguf", images)
    (out / "llama_cpp_image_features.json").write_text(json.dumps(
        {"seed": 0, "features": [f.round(6).tolist() for f in features]}) + "\n")


GEMMA4_VISION_PIECES = ("<|image|>", "<|image>", "<image|>", "<|video|>")
GEMMA4_VISION_TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16,
                          max_position_embeddings=512, sliding_window=8, final_logit_softcapping=30.0, pad_token_id=0,
                          eos_token_id=1, bos_token_id=2, num_hidden_layers=4, num_key_value_heads=1,
                          hidden_size_per_layer_input=16, global_head_dim=32, use_bidirectional_attention="vision",
                          layer_types=["sliding_attention"] * 3 + ["full_attention"])
GEMMA4_VISION_TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, patch_size=16, position_embedding_size=128,
                           pooling_kernel_size=3)


def gemma4_vision(llama_cpp_dir: str) -> None:
    import shutil

    from gemmakit.models.mobilenet import import_torchvision

    import_torchvision()  # (transformers' vision models import it)
    from transformers import AutoTokenizer, Gemma4Config, Gemma4ForConditionalGeneration

    out = HERE / "gemma4-vision"
    shutil.rmtree(out, ignore_errors=True)
    hf = out / "hf"
    hf.mkdir(parents=True)
    global VISION_PIECES
    VISION_PIECES = GEMMA4_VISION_PIECES
    vocab = tokenizer(hf, vision=True)
    ids = [AutoTokenizer.from_pretrained(hf).convert_tokens_to_ids(p) for p in GEMMA4_VISION_PIECES]
    config = Gemma4Config(text_config={**GEMMA4_VISION_TEXT, "vocab_size": vocab, "vocab_size_per_layer_input": vocab},
                          vision_config=GEMMA4_VISION_TOWER, audio_config=None, image_token_id=ids[0],
                          boi_token_id=ids[1], eoi_token_id=ids[2], video_token_id=ids[3])
    model = Gemma4ForConditionalGeneration(config).eval()
    randomise(model, 21)
    model.save_pretrained(hf)
    # the processor's defaults (a 280-token budget), which a GGUF without the directory falls back to
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    Gemma4ImageProcessorPil().save_pretrained(hf)
    for extra in ("--mmproj",), ():
        convert(llama_cpp_dir, [str(hf), "--outfile", str(out / ("mmproj-gemma4-vision-f32.gguf" if extra
                                                                  else "gemma4-vision-f32.gguf")),
                                "--outtype", "f32", *extra])


def convert(llama_cpp_dir: str, args: list[str]) -> None:
    """convert_hf_to_gguf.py ``args``, in a process where torchvision imports beside a CPU torch
    (gemmakit's shim: transformers' tokenizer import pulls torchvision in)."""
    script = ("import os, runpy, sys; from gemmakit.models.mobilenet import import_torchvision; import_torchvision(); "
              "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    subprocess.run([sys.executable, "-c", script, f"{llama_cpp_dir}/convert_hf_to_gguf.py", *args], check=True)


def vision_images(seed: int = 0) -> list[np.ndarray]:
    """Two 32x32 RGB images (uint8 [H, W, 3]) at the tower's own size, so that no resize (where
    llama.cpp's bilinear filter and Pillow's differ) comes between the files and the tower: a
    gradient and noise."""
    gradient = np.zeros((32, 32, 3), dtype=np.uint8)
    gradient[..., 0] = np.linspace(0, 255, 32, dtype=np.uint8)[None]
    gradient[..., 1] = np.linspace(255, 0, 32, dtype=np.uint8)[:, None]
    gradient[8:20, 10:26, 2] = 220
    return [gradient, np.random.RandomState(seed).randint(0, 256, size=(32, 32, 3)).astype(np.uint8)]


def llama_cpp_image_features(text: Path, mmproj: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """llama.cpp's soft tokens ``[tokens, text width]`` for each image: its mtmd library (clip.cpp)
    encodes the image chunk of a prompt that is just the media marker."""
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=str(text), n_ctx=64, verbose=False, n_threads=2)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 2, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not open {mmproj}")
    width = llama_cpp.llama_model_n_embd(llm._model.model)
    marker = mtmd.mtmd_default_marker()
    out = []
    try:
        for rgb in images:
            h, w, _ = rgb.shape
            bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes()))
            chunks = mtmd.mtmd_input_chunks_init()
            prompt = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
                raise RuntimeError("mtmd_tokenize failed")
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    if mtmd.mtmd_encode_chunk(ctx, chunk):
                        raise RuntimeError("mtmd_encode_chunk failed")
                    embd = mtmd.mtmd_get_output_embd(ctx)
                    out.append(np.ctypeslib.as_array(embd, shape=(n * width,)).reshape(n, width).copy())
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
    finally:
        mtmd.mtmd_free(ctx)
    return out


if __name__ == "__main__":
    for which in sys.argv[2:] or ["gemma4", "gemma3n", "gemma3-vision", "gemma4-vision"]:
        {"gemma4": gemma4, "gemma3n": gemma3n, "gemma3-vision": gemma3_vision,
         "gemma4-vision": gemma4_vision}[which](sys.argv[1])
