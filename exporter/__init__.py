"""Training, evaluation and export of model bundles (``python -m exporter``).

OpenVINO's model converter and NNCF send usage events to Google Analytics and write a client id under ``~/intel``
through the ``openvino_telemetry`` package, unless the user opted out: a training box without internet then holds
a forked sender per conversion, and a box with it reports our users' runs.  Both fall back to their own stubs where
the package cannot be imported, so it is kept from loading before anything imports them (as the worker does).
"""

import sys

sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
