"""Capacity model: proxy replicas, optimizer GPUs and Redis load for a request rate and cache hit rate.

    python deploy/capacity.py --rps 2000 --optimized-share 0.9 --hit-rate 0.5 0.8 \\
        --replica-rps 500 --gpu-rewrites 100

deploy/README.md explains each input and works an example through; plug in your own measured figures.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Redis commands per optimizer-eligible request: one GET always; a fleet-wide miss adds the single-flight
# lock (SET NX PX), the value (SET), the wake-up of waiting replicas (PUBLISH) and the lock release (DEL).
REDIS_OPS_PER_LOOKUP = 1
REDIS_OPS_PER_MISS = 4


@dataclass(frozen=True)
class Inputs:
    requests_per_second: float
    optimized_share: float
    replica_requests_per_second: float
    gpu_rewrites_per_second: float
    cpu_target: float = 0.65
    gpu_target: float = 0.7
    spare_gpus: int = 1
    min_replicas: int = 2


@dataclass(frozen=True)
class Plan:
    hit_rate: float
    rewrites_per_second: float
    proxy_replicas: int
    optimizer_gpus: int
    redis_ops_per_second: float


def plan(inputs: Inputs, hit_rate: float) -> Plan:
    """Size one deployment: replicas from total traffic, GPUs from cache misses only."""
    eligible = inputs.requests_per_second * inputs.optimized_share
    rewrites = eligible * (1 - hit_rate)
    replicas = math.ceil(inputs.requests_per_second / (inputs.replica_requests_per_second * inputs.cpu_target))
    gpus = math.ceil(rewrites / (inputs.gpu_rewrites_per_second * inputs.gpu_target))
    # Any optimization at all needs one serving GPU; the spares come on top of that.
    gpus = max(1, gpus) + inputs.spare_gpus if rewrites > 0 else 0
    redis = eligible * (REDIS_OPS_PER_LOOKUP + REDIS_OPS_PER_MISS * (1 - hit_rate))
    return Plan(hit_rate, rewrites, max(inputs.min_replicas, replicas), gpus, redis)


def render(plans: Sequence[Plan]) -> str:
    header = f"{'hit rate':>8}  {'rewrites/s':>10}  {'proxy replicas':>14}  {'optimizer GPUs':>14}  {'Redis ops/s':>11}"
    rows = [f"{p.hit_rate:>8.2f}  {p.rewrites_per_second:>10.0f}  {p.proxy_replicas:>14d}  "
            f"{p.optimizer_gpus:>14d}  {p.redis_ops_per_second:>11.0f}" for p in plans]
    return "\n".join([header, *rows])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Size bpo-proxy replicas and optimizer GPUs (deploy/README.md).")
    parser.add_argument("--rps", type=float, required=True, help="peak chat completions per second, all replicas")
    parser.add_argument("--optimized-share", type=float, default=1.0,
                        help="share of requests sent to the optimizer: treatment arm x user turns under the "
                             "length limit (default 1.0)")
    parser.add_argument("--hit-rate", type=float, nargs="+", required=True,
                        help="rewrite cache hit rate(s) among optimized requests, 0-1; one table row each")
    parser.add_argument("--replica-rps", type=float, required=True,
                        help="requests/s one proxy replica sustains on its CPU request (bench/README.md)")
    parser.add_argument("--gpu-rewrites", type=float, required=True,
                        help="rewrites/s one optimizer GPU sustains within the deadline (bench/README.md)")
    parser.add_argument("--cpu-target", type=float, default=0.65, help="HPA CPU utilization target (0.65)")
    parser.add_argument("--gpu-target", type=float, default=0.7,
                        help="planned GPU utilization, headroom for bursts before rewrites time out (0.7)")
    parser.add_argument("--spare-gpus", type=int, default=1, help="GPUs kept for failures and rollouts (1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    inputs = Inputs(args.rps, args.optimized_share, args.replica_rps, args.gpu_rewrites,
                    args.cpu_target, args.gpu_target, args.spare_gpus)
    print(render([plan(inputs, hit_rate) for hit_rate in args.hit_rate]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
