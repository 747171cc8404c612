"""Write deploy/constraints.txt from a ``pip install --dry-run --report`` of the images' dependencies.

    pip install --dry-run --ignore-installed --quiet --report /tmp/r.json '.[gpu]'
    python deploy/lock.py /tmp/r.json > deploy/constraints.txt

torch's CUDA runtime wheels (nvidia-*, triton) follow the index a GPU build installs torch from, so they
are left to torch's own pins; local version labels (``+cpu``) are dropped for the same reason.
"""

from __future__ import annotations

import json
import sys

HEADER = """\
# Pinned versions the Docker images install from (pip install -c deploy/constraints.txt ...): the base
# dependencies and the [gpu] extra, resolved together, so an image build is reproducible.
# Regenerate after changing dependencies in pyproject.toml:
#   pip install --dry-run --ignore-installed --quiet --report /tmp/r.json '.[gpu]'
#   python deploy/lock.py /tmp/r.json > deploy/constraints.txt
"""
FOLLOW_TORCH = ("nvidia-", "triton")


def pins(report: dict) -> list[str]:
    found = set()
    for item in report["install"]:
        name = item["metadata"]["name"].lower().replace("_", "-")
        if name != "bpo-proxy" and not name.startswith(FOLLOW_TORCH):
            found.add(f"{name}=={item['metadata']['version'].split('+')[0]}")
    return sorted(found)


if __name__ == "__main__":
    with open(sys.argv[1]) as report:
        sys.stdout.write(HEADER + "".join(line + "\n" for line in pins(json.load(report))))
