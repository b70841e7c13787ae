class ModelLoadError(ValueError):
    """A model path or file could not be used; the message names the path or file."""
