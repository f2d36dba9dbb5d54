"""MODEL as the command line names it: a zoo name, `path/to/file.py:factory` or
`hf:path/to/config.json`, built on the meta device with its shape and dtype."""
