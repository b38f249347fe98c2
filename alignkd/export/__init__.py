"""Exports of a trained student to other runtimes: ``gguf_file.export_gguf`` writes llama.cpp's (and Ollama's) GGUF.

This module stays light (no torch, no gguf) so that the command line can read ``DTYPES`` for its flags.
"""

DTYPES = ("auto", "float32", "float16", "bfloat16")
"""Precisions of the exported matrices; ``auto`` keeps a float16/bfloat16 student so and writes the rest as float32."""
