"""Stages: the contract (base) and every registered stage.

Importing a stage module registers its classes under their recipe `kind`; a new stage module adds
one import line here.
"""

from curate.stages.base import (
    STAGES,
    Drop,
    Filter,
    GlobalStage,
    RowStage,
    Stage,
    StageConfig,
    build_stage,
    register,
)

# Imported to register their stages, one module a line.
from curate.stages import clip_score  # noqa: F401
from curate.stages import pair_filters  # noqa: F401
from curate.stages import exact_dedup  # noqa: F401
from curate.stages import download  # noqa: F401
from curate.stages import html_extract  # noqa: F401
from curate.stages import image  # noqa: F401
from curate.stages import language_filter  # noqa: F401
from curate.stages import phash  # noqa: F401
from curate.stages import near_dedup  # noqa: F401
from curate.stages import eval_decontaminate  # noqa: F401
from curate.stages import score_filter  # noqa: F401
from curate.stages import semantic_dedup  # noqa: F401
from curate.stages import text_quality  # noqa: F401
from curate.stages import minhash  # noqa: F401
from curate.stages import segment_dedup  # noqa: F401
from curate.stages import text_decontaminate  # noqa: F401
from curate.stages import recaption  # noqa: F401
from curate.stages import metaclip  # noqa: F401
from curate.stages import blocklist  # noqa: F401
from curate.stages import pii  # noqa: F401
from curate.stages import face_blur  # noqa: F401
from curate.stages import image_scores  # noqa: F401

__all__ = ["STAGES", "Drop", "Filter", "GlobalStage", "RowStage", "Stage", "StageConfig", "build_stage", "register"]
