"""The bottom layer: gemmakit's compiled CPU kernels and the dispatch of products to them.

- ``build``: compiles ``csrc/`` with torch's extension builder on first use (``kernel()``), for
  the CPU it runs on or for AVX2 (``GEMMAKIT_CPU_ISA``); reports the CPU's usable features.
- ``gemm``: float32 many-row products on oneDNN, 16-bit few-row products on the block kernel.
- ``ops``: RMSNorm, QK-norm + RoPE, GELU(gate) * up and one-query attention in one call each.

Nothing here imports the rest of gemmakit; models, quant and the tokenizer import it.
"""
