"""Text-based person retrieval: data, tokenizer, transforms, losses and metrics."""
