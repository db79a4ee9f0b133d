"""Pure-Python engine core: requests, sampling parameters, the block manager, step plans
and the schedulers. Imports nothing of the project and never torch, so the simulator and
the planner run these very classes where torch is absent."""

from distserve.core.block_manager import BlockManager
from distserve.core.config import CacheConfig, SchedulerConfig
from distserve.core.plan import ScheduledChunk, StepPlan, StepResult, TokenLogprobs
from distserve.core.request import FinishReason, Request, RequestStatus
from distserve.core.sampling_params import SamplingParams
from distserve.core.scheduler import (
    ColocatedScheduler,
    DecodeScheduler,
    PrefillScheduler,
    Scheduler,
    StepOutput,
)

__all__ = [
    "BlockManager",
    "CacheConfig",
    "ColocatedScheduler",
    "DecodeScheduler",
    "FinishReason",
    "PrefillScheduler",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerConfig",
    "StepOutput",
    "StepPlan",
    "StepResult",
    "TokenLogprobs",
]
