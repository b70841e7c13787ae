"""Model architecture plugins.  ``decoder.py`` holds the shared decoder-only transformer;
each architecture file says how its checkpoints differ from it and registers itself."""
