"""Built-in plugins.  Each registers through the ``pagedllm`` entry-point group, exactly as a
third-party package would (see pyproject.toml)."""
