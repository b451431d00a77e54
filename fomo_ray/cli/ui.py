"""``fomo-ray ui``: the MLflow UI of the project's tracking store, bound to 127.0.0.1."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``fomo-ray ui``: browse the project's MLflow store at http://127.0.0.1:PORT (Ctrl-C stops it)."""
    from fomo_ray.tracking import ARTIFACT_DIR, resolve_uri, ui_command

    ap = argparse.ArgumentParser(prog="fomo-ray ui", description=main.__doc__)
    ap.add_argument("--output-dir", default="runs", help="the experiments' output_dir (holds mlflow.db)")
    ap.add_argument("--uri", default="", help="tracking URI (default: MLFLOW_TRACKING_URI or OUTPUT_DIR/mlflow.db)")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args = ap.parse_args(argv)
    uri = resolve_uri(args.uri, args.output_dir)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        print(f"fomo-ray ui: no MLflow database at {uri[len('sqlite:///'):]} (run a sweep first, or pass --uri)",
              file=sys.stderr)
        return 2
    cmd = ui_command(uri, args.port, Path(args.output_dir) / ARTIFACT_DIR)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port}  (Ctrl-C to stop)")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
