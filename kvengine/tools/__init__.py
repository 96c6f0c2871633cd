"""Tool calling in OpenAI's shape: the tools a request offers, how it may call them, and calls read back from text."""
