"""The edge worker (``python -m worker``).

``import openvino`` loads its model converter, whose telemetry writes a client id under ``~/intel`` and sends an
"import" event to Google Analytics from a forked process unless the user opted out; with HOME unusable it logs a
line about a file no operator has heard of.  The worker converts nothing, so it keeps that package from loading
before anything imports openvino: OpenVINO then uses its own stub, as where the package is not installed.
"""

import sys

sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
