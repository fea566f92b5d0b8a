"""Files: everything dorat writes survives a crash whole, and nothing it reads runs code.

``checkpoint``: atomic writes (temporary file, fsync, rename), safetensors checkpoints of nested
state, JSON written strictly, weights read from safetensors or ``weights_only`` state dicts,
file digests. ``locks``: one process owns a run directory (fcntl locks the kernel releases when
the process dies).

Imports: errors only, so that every layer may use it (tests/test_layers.py).
"""
