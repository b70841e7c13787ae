"""Quantization method plugins (hook: ``register_quantization_methods``)."""
