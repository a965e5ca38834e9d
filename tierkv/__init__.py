"""tierkv: a tiered KV-cache runtime. KV blocks live in GPU memory, pinned CPU memory or NVMe files."""

from tierkv.beam import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from tierkv.config import EngineConfig, PageManagerConfig
from tierkv.errors import CapacityError, ConfigError, CorruptBlockError, StoreError, TierKVError, WorkerError
from tierkv.kv.block import Block
from tierkv.kv.manager import PageManager
from tierkv.layout import KVLayout
from tierkv.llm import LLM
from tierkv.outputs import CompletionOutput, Logprob, RequestOutput
from tierkv.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "EngineConfig",
    "KVLayout",
    "PageManager",
    "PageManagerConfig",
    "Block",
    "TierKVError",
    "ConfigError",
    "CapacityError",
    "StoreError",
    "CorruptBlockError",
    "WorkerError",
]
