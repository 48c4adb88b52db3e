"""Container healthcheck: GET http://127.0.0.1:PORT/PATH, exit 0 on 200.

PORT is the first argument, else LIGHTBOX_METRICS_PORT; PATH the second, else healthz.
Python's standard library only: the image has no curl."""

import os
import sys
import urllib.request

port = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LIGHTBOX_METRICS_PORT", "9400")
path = sys.argv[2] if len(sys.argv) > 2 else "healthz"
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"{path} on port {port}: {exc}", file=sys.stderr)
    sys.exit(1)
