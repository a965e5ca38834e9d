"""Starting the server: the LLM, its engine thread, the app on uvicorn; SIGTERM or Ctrl-C drains (the running
requests finish, new ones are refused, up to `drain_s`), then the engine closes as `LLM.close()` does."""

from __future__ import annotations

import sys
import time

import yaml

from tierkv.config import EngineConfig
from tierkv.errors import ConfigError


def engine_options(config_path: str | None, overrides: list[str]) -> dict:
    """Engine options from a YAML file (its `engine:` mapping, or the whole file) and `key=value` overrides."""
    options: dict = {}
    if config_path:
        try:
            with open(config_path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--config {config_path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {config_path}: expected a mapping of engine options")
        options.update(data.get("engine", data))
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: write it as KEY=VALUE, e.g. --set gpu_memory=20GiB")
        options[key.strip().removeprefix("engine.")] = yaml.safe_load(raw)
    known = set(EngineConfig.__dataclass_fields__) - {"model"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown engine option(s) {unknown}; known: {', '.join(sorted(known))}")
    return options


def start_engine(llm, max_waiting: int = 1024):
    """The engine's own thread for `llm`, warmed up on it before it takes a request: kernels compiled, CUDA graphs
    captured and cuDNN's prompt-attention shapes planned, not inside the first requests' time (cuDNN looks for its
    plans on the thread that runs the steps, so that is where they are made)."""
    from tierkv.llm import LLM
    from tierkv.serve.engine_loop import EngineLoop

    engine = EngineLoop(llm, max_waiting=max_waiting)
    try:
        engine.call(LLM.warm_up).result()
    except BaseException:
        engine.close(0)
        raise
    return engine


def serve(
    model: str,
    options: dict,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_name: str | None = None,
    max_waiting: int = 1024,
    drain_s: float = 30.0,
) -> None:
    import uvicorn

    from tierkv.llm import LLM
    from tierkv.serve.app import build_app

    t0 = time.perf_counter()
    engine = start_engine(LLM(model, **options), max_waiting)
    print(f"tierkv serve: started and warmed up in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    # On SIGTERM uvicorn stops accepting connections and lets open ones finish (up to drain_s); then the engine
    # finishes what it still runs (up to drain_s again), aborts the rest and closes the LLM (the prefix store kept).
    app = build_app(engine, served_name or model, api_key, on_shutdown=lambda: engine.close(drain_s))

    try:
        uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=drain_s, log_level="info")
    finally:
        engine.close(0)
