"""tierkv: a tiered KV-cache runtime. KV blocks live in GPU memory, pinned CPU memory or NVMe files."""

from tierkv.config import PageManagerConfig
from tierkv.errors import CapacityError, ConfigError, CorruptBlockError, StoreError, TierKVError
from tierkv.layout import KVLayout
from tierkv.page_manager import Block, PageManager

__version__ = "0.1.0"

__all__ = [
    "KVLayout",
    "PageManager",
    "PageManagerConfig",
    "Block",
    "TierKVError",
    "ConfigError",
    "CapacityError",
    "StoreError",
    "CorruptBlockError",
]
