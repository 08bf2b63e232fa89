"""The embedded demo: a seeded contaminated corpus, a tokenizer and a tiny GPT-2 trained on it."""
