"""``sigec serve ENGINE``: start a local Ray instance (or join one), deploy, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from sigec.core.engine_file import read_manifest
from sigec.core.errors import BackendError, InputError

# Object store of a local Ray instance: request bodies pass through it between the ingress and
# the engine replicas (one SPADE label map is 18 MiB); Ray's default takes 30% of the memory.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20


def serve_command(args: argparse.Namespace) -> int:
    """Run the server for the parsed ``sigec serve`` arguments; returns the exit status."""
    engine = Path(args.engine)
    read_manifest(engine)  # a missing or broken engine file fails here, before Ray starts
    if args.replicas < 1 or (args.threads is not None and args.threads < 1):
        raise InputError("--replicas and --threads must be >= 1")
    if args.max_cache_mib is not None and args.max_cache_mib <= 0:
        raise InputError("--max-cache-mib must be > 0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the network
    local = args.address is None
    if local:
        # A local instance is one node: Ray's processes then bind and talk on 127.0.0.1 only
        # (by default Ray uses the machine's network address even for a local instance).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve

        from sigec.apps.serve.app import APP_NAME, build_app
    except ImportError as exc:
        raise BackendError(f"`sigec serve` needs the serve extra (pip install 'sigec[serve]'): {exc}") from None

    threads = args.threads or 1
    if local:
        ray.init(num_cpus=max(os.cpu_count() or 1, args.replicas * threads), include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False)
    else:
        ray.init(address=args.address, log_to_driver=False)
    stop = threading.Event()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        max_bytes = int(args.max_cache_mib * 2**20) if args.max_cache_mib else None
        serve.run(build_app(str(engine), replicas=args.replicas, threads=threads, max_cache_bytes=max_bytes,
                            cache_dtype=getattr(args, "cache_dtype", None)),
                  name=APP_NAME, route_prefix="/", blocking=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        bound = f"{args.max_cache_mib:g} MiB of caches" if max_bytes else "unbounded caches"
        print(f"sigec serve: http://{args.host}:{args.port}/ serves {engine} with {args.replicas} replica(s) x "
              f"{threads} thread(s), {bound} per replica; SIGINT or SIGTERM stops", flush=True)
        while not stop.wait(0.5):
            pass
        print("sigec serve: stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    print("sigec serve: stopped", flush=True)
    return 0
