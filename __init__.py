"""baton: a disaggregated LLM serving system.

The offline API lives here; importing `baton` stays cheap (torch loads only when LLM or
SamplingParams is first touched), so `baton.router` and friends never pay for the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from baton.services.engine.llm import LLM
    from baton.services.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from baton.services.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from baton.services.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'baton' has no attribute {name!r}")
