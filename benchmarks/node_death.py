"""How long Ray takes to declare a killed node dead, with Ray's health-check defaults and with the project's
`launch.NODE_HEALTH_CHECKS`: a `ray.cluster_utils.Cluster` (a head plus one 1-CPU raylet holding an actor), the
raylet SIGKILLed, then polled until the actor's call fails and the node is listed dead.

    python -m benchmarks.node_death   # -> benchmarks/results/node_death-<date>.{json,md}
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def once(system_config: dict) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": system_config})
    node = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    actor = ray.remote(num_cpus=1)(type("Pinger", (), {"ping": lambda self: 1})).remote()
    ray.get(actor.ping.remote())
    t0 = time.time()
    c.remove_node(node, allow_graceful=False)
    actor_dead = node_dead = None
    while time.time() - t0 < 200 and (actor_dead is None or node_dead is None):
        if actor_dead is None:
            try:
                ray.get(actor.ping.remote(), timeout=1)
            except ray.exceptions.GetTimeoutError:
                pass
            except ray.exceptions.RayError:
                actor_dead = time.time() - t0
        if node_dead is None and not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            node_dead = time.time() - t0
        time.sleep(0.2)
    ray.shutdown()
    c.shutdown()
    return {"actor_call_fails_s": round(actor_dead, 2), "node_listed_dead_s": round(node_dead, 2)}


def main(argv=None) -> int:
    from raytrain_align.launch import NODE_HEALTH_CHECKS

    runs = {"ray defaults": [], "NODE_HEALTH_CHECKS": []}
    for _ in range(2):  # alternated
        runs["ray defaults"].append(once({}))
        runs["NODE_HEALTH_CHECKS"].append(once(NODE_HEALTH_CHECKS))
    date = time.strftime("%Y-%m-%d")
    meta = {"command": "python -m benchmarks.node_death", "date": date,
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})", "settings": NODE_HEALTH_CHECKS}
    out = REPO / "benchmarks" / "results"
    (out / f"node_death-{date}.json").write_text(json.dumps({**meta, "runs": runs}, indent=2))
    md = (f"Command: `{meta['command']}`  \nMachine: {meta['machine']}  \nDate: {date}\n\n"
          "| health checks | node listed dead, s (median of runs) | runs |\n|---|---|---|\n"
          + "".join(f"| {k} | {statistics.median(r['node_listed_dead_s'] for r in v):.1f} | "
                    f"{', '.join(str(r['node_listed_dead_s']) for r in v)} |\n" for k, v in runs.items()))
    (out / f"node_death-{date}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
