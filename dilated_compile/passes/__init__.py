"""FX graph passes, one per file, each ``(gm) -> gm``."""

from .rewrite_annotated_sdpa import Rewrite, rewrite_annotated_sdpa

__all__ = ["Rewrite", "rewrite_annotated_sdpa"]
