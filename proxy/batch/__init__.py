"""OpenAI's Batch API on the proxy: the runner that moves batches and the OpenRouter batch path."""
