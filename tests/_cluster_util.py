"""What the local-cluster scenarios (tests/_*_cluster.py, tests/_two_node_train.py) share: bench/two_node_cluster.py's
node helpers, loaded by path, and the scenario's command line. Each scenario runs in a process of its own, because
Ray's token authentication must be set before ``ray`` is imported."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def cluster_helpers():
    """bench/two_node_cluster.py as a module (start_node, local_cluster, kill_session, stop_nodes, ...), imported
    from bench/ as bench/autoscaling.py imports it."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import two_node_cluster

    return two_node_cluster


def scenario_main(main: Callable[[Path, str, float], dict]) -> None:
    """``python tests/_<scenario>.py OUT FIFMINI_ROOT FIFMINI_SCALE``: run ``main`` and write its summary to
    ``OUT/summary.json``, which the test judges."""
    out = Path(sys.argv[1])
    result = main(out, sys.argv[2], float(sys.argv[3]))
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
