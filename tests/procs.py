"""Process helpers for the tests (they live in ``svg_ray.testing.procs``)."""

from svg_ray.testing.procs import free_port, stop_process_group, wait_http

__all__ = ["free_port", "stop_process_group", "wait_http"]
