"""The operator console: a small web app over the worker's MQTT API (see docs/console.md)."""
