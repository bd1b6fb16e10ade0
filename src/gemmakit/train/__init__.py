"""Fine-tuning, distillation, perplexity and distributed training (see the README section)."""
