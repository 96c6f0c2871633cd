"""`kvengine cluster`: N engine replicas behind one OpenAI-compatible endpoint on Ray Serve (kvengine/cluster)."""

from __future__ import annotations

import sys
import time

import typer

from kvengine.cli.app import app
from kvengine.cli.options import FAST_WEIGHTS, EngineOptions, engine_options
from kvengine.cli.serve import ApiKeyOpt, MaxWaitingOpt, ServedNameOpt, warn_if_open

RouterOpt = typer.Option("kvengine", "--router", help="Request router: kvengine (KV-block aware), round_robin, "
                         "power_of_two (Ray Serve's default), prefix_affinity (Ray's PrefixCacheAffinityRouter).")


CLUSTER_OPTIONS = ("model", "max_num_seqs", "max_model_len", "dtype", "weights", "device", "num_threads",
                   "kv_cache_dtype", "kv_cache_memory", "kv_window", "sink_tokens")


@app.command()
@engine_options(*CLUSTER_OPTIONS, weights=FAST_WEIGHTS)
def cluster(
    replicas: int = typer.Option(2, "--replicas", "-r", help="Engine replicas (each one kvengine engine)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", help="TCP port of the endpoint (0 = any free port)."),
    address: str | None = typer.Option(None, "--address", help="Join this Ray cluster (e.g. 10.0.0.1:6379, or "
                                       "'auto') instead of starting a local Ray instance."),
    router: str = RouterOpt,
    api_key: list[str] | None = ApiKeyOpt,
    max_waiting: int = MaxWaitingOpt,
    served_model_name: str | None = ServedNameOpt,
    cpus_per_replica: float | None = typer.Option(None, "--cpus-per-replica", help="Ray CPUs per replica (default: "
                                                  "this machine's cores / replicas; 1 on a cluster)."),
    *, engine: EngineOptions,
) -> None:
    """Serve a model from N replicas on Ray Serve behind one OpenAI-compatible endpoint, routed by KV cache."""
    from kvengine.cluster import require_ray
    from kvengine.cluster.app import ClusterConfig, prepare, start, stop
    engine_config = engine.config()
    engine_config.resolved_dtype()  # bad engine options: one line here, not in every replica
    config = ClusterConfig(replicas=replicas, model=engine.model, engine=engine_config, host=host, port=port,
                           address=address, api_keys=list(api_key or []), served_model_name=served_model_name,
                           max_waiting=max_waiting, router=router, cpus_per_replica=cpus_per_replica)
    require_ray()
    prepare(config)
    warn_if_open(host, api_key)
    print(f"kvengine cluster: starting {replicas} replica(s) on Ray Serve ({router} router)...", file=sys.stderr)
    try:
        url = start(config, quiet=True)
        print(f"kvengine cluster serving on {url} ({replicas} replicas, {config.cpus_per_replica:g} CPUs and "
              f"{engine_config.num_threads} threads each); Ctrl-C stops it", file=sys.stderr)
        while True:
            time.sleep(3600)
    finally:
        stop()
