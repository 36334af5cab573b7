"""Tiny checkpoints of every supported family, one builder each: ``BUILDERS[arch](directory)`` saves a seeded
random model there (with transformers) and returns ``(directory, hf_model)``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.infer.test_deepseek import make_tiny_deepseek
from tests.infer.test_gpt_oss import make_tiny_gpt_oss
from tests.tiny_models import make_tiny

BUILDERS: dict[str, Callable[[Path], Any]] = {
    **{arch: functools.partial(make_tiny, arch) for arch in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")},
    "deepseek_v2": functools.partial(make_tiny_deepseek, "v2_group_limited_no_q_lora"),
    "deepseek_v3": functools.partial(make_tiny_deepseek, "v3_noaux_tc"),
    "gpt_oss": make_tiny_gpt_oss,
}
