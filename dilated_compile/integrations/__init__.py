"""Adapters for other libraries' models.

Each adapter is a subpackage imported on demand (importing ``dilated_compile`` imports none of
them, so their libraries stay optional):

- ``dilated_compile.integrations.transformers``: Hugging Face transformers (``pip install
  dilated-compile[hf]``): attention implementations ``"dilated_compile"`` and
  ``"dilated_compile_sdpa"``, and the bounded ``DilatedCache``. ``dilated_compile.apply`` uses it
  by itself for transformers models.
"""
