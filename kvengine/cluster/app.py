"""Building and running the cluster: N EngineReplica replicas behind one Frontend, as one Ray Serve application
on a local Ray instance (bound to loopback) or an existing cluster (`address`).

Before anything starts, a local run checks that N replicas fit the machine's available memory (weights, KV
pool and the runtime of each replica's process) and refuses with one line if not. Without an explicit KV
budget each replica gets a quarter of the free memory divided by N (one engine alone takes a quarter).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from kvengine.engine.config import EngineConfig
from kvengine.errors import ConfigError

APP_NAME = "kvengine"
ENGINE_DEPLOYMENT = "engine"
ROUTERS = {
    "kvengine": "kvengine.cluster.router.KVCacheRouter",
    "round_robin": "kvengine.cluster.baselines.RoundRobinRouter",
    "power_of_two": "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter",
    # Ray's own class; its public alias (ray.serve.llm.request_router) insists on vLLM or SGLang being installed
    "prefix_affinity": "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router."
                       "PrefixCacheAffinityRouter",
}
TEXT_ROUTERS = {"prefix_affinity"}  # routers that read the prompt's text rather than its block keys
RUNTIME_BYTES = 700 << 20  # one replica process beside its weights and KV pool: Python, torch, Ray's worker
WEIGHT_BITS = {"float32": 32, "bfloat16": 16, "float16": 16, "int8": 8.5, "int4": 4.5}


@dataclass(slots=True)
class ClusterConfig:
    replicas: int = 2
    model: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)  # each replica's (threads, KV budget: `prepare`)
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None  # an existing Ray cluster; None = start a local one
    api_keys: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    max_waiting: int = 256
    router: str = "kvengine"
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    stats_period_s: float = 0.5  # how often each replica reports its block keys to the router
    cpus_per_replica: float | None = None  # default: this machine's cores / replicas (local), else 1

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if self.router not in ROUTERS:
            raise ConfigError(f"unknown router '{self.router}' (choose from {', '.join(ROUTERS)})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.max_waiting < 1:
            raise ConfigError(f"--max-waiting must be at least 1, got {self.max_waiting}")


def prepare(config: ClusterConfig) -> ClusterConfig:
    """Fill in per-replica threads and KV budget; refuse (ConfigError) what cannot fit. No Ray needed."""
    from kvengine.cache.pool import DEFAULT_BUDGET_CAP, available_memory

    engine = config.engine
    cores = os.cpu_count() or 1
    if config.cpus_per_replica is None:
        config.cpus_per_replica = max(1, cores // config.replicas) if config.address is None else 1
    if engine.num_threads is None:
        engine.num_threads = max(1, int(config.cpus_per_replica))
    if config.address is not None:
        return config  # the memory is the cluster's: Ray places the replicas where they fit
    free = available_memory("cpu")
    if engine.kv_cache_memory is None:
        engine.kv_cache_memory = int(min(free // 4 // config.replicas, DEFAULT_BUDGET_CAP))
    budget = engine.kv_cache_memory
    kv = budget * free if budget <= 1 else budget
    weights = _weights_bytes(config)
    need = config.replicas * (weights + kv + RUNTIME_BYTES)
    if need > free:
        gib = 1 << 30
        raise ConfigError(f"{config.replicas} replicas need about {need / gib:.1f} GiB ({weights / gib:.2f} GiB "
                          f"weights "
                          f"+ {kv / gib:.2f} GiB KV + {RUNTIME_BYTES / gib:.2f} GiB runtime each) but "
                          f"{free / gib:.1f} GiB is available; use fewer replicas, a smaller --kv-cache-memory "
                          f"or --weights int4")
    return config


def _weights_bytes(config: ClusterConfig) -> int:
    from kvengine.accounting.memory import weights_bytes
    from kvengine.weights.source import open_model_source

    engine = config.engine
    fmt = engine.quantized_weights or engine.resolved_dtype()
    return weights_bytes(open_model_source(config.model, quiet=True).model_config(), WEIGHT_BITS[fmt])


def build(config: ClusterConfig) -> Any:
    """The Ray Serve application (frontend bound to the engine deployment)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from kvengine.cluster.frontend import Frontend
    from kvengine.cluster.replica import EngineReplica

    max_num_seqs = config.engine.max_num_seqs
    router = RequestRouterConfig(request_router_class=ROUTERS[config.router],
                                 request_router_kwargs=config.router_kwargs,
                                 request_routing_stats_period_s=config.stats_period_s,
                                 request_routing_stats_timeout_s=max(5.0, 4 * config.stats_period_s))
    engines = serve.deployment(EngineReplica, name=ENGINE_DEPLOYMENT, num_replicas=config.replicas,
                               max_ongoing_requests=max_num_seqs + config.max_waiting,
                               ray_actor_options={"num_cpus": config.cpus_per_replica},
                               request_router_config=router, health_check_period_s=2.0,
                               health_check_timeout_s=30.0, graceful_shutdown_timeout_s=2.0)
    frontend = serve.deployment(Frontend, name="frontend", num_replicas=1, max_ongoing_requests=100_000,
                                ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=2.0)
    return frontend.bind(engines.bind(config.model, config.engine, config.max_waiting), config.model,
                         config.served_model_name, config.api_keys, config.max_waiting, ENGINE_DEPLOYMENT,
                         config.router in TEXT_ROUTERS)


def start(config: ClusterConfig, quiet: bool = True) -> str:
    """Start Ray (local and on loopback only, loopback.py, unless config.address), Serve's HTTP proxy on
    host:port and the application; returns its base url once every replica is up."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from kvengine.cluster.loopback import LOOPBACK, local_node_on_loopback

    port = config.port or free_port(config.host)
    if not ray.is_initialized():
        if config.address is None:
            cores = os.cpu_count() or 1
            with local_node_on_loopback():
                ray.init(num_cpus=max(cores, int(config.replicas * (config.cpus_per_replica or 1)) + 1),
                         include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=not quiet,
                         configure_logging=not quiet)
        else:
            ray.init(address=config.address, log_to_driver=not quiet)
    serve.start(http_options={"host": config.host, "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False)
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{port}"


def stop() -> None:
    """Shut the application, Serve and (if this process started it) Ray down."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
