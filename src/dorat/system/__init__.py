"""The machine and its processes: devices, bf16 support, the allocator, torchrun.

``runtime``: which device a config names, whether bf16 autocast is native on this CPU or GPU,
glibc's allocator settings, the machine facts recorded in every run. ``distributed``: the
process group under torchrun (DDP), its all-reduces and the one rank that writes.

Imports: errors only, so that every layer may use it (tests/test_layers.py).
"""
