"""Quality readouts: perplexity through the engine's cached path, and what each KV dtype costs (`eval kv`)."""
