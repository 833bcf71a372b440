"""The decode engine: the model spec, the engine and its buffers, captured graphs and the rounds."""
