"""Talking to a model: a streaming KV-cache decoder and a multi-turn chat session."""
