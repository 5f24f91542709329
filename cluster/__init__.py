"""numoe coordinator side: GGUF models, tokenizer, engine, CLI."""
