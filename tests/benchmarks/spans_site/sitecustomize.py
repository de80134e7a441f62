"""Loaded by every Python process of the create benchmark's Airflow (``PYTHONPATH``): patches
the modules ``tests.benchmarks.create_spans`` times, as each is imported."""

try:
    from tests.benchmarks.create_spans import install_on_import

    install_on_import()
except Exception as exc:  # noqa: BLE001 - a benchmark aid must never stop Airflow starting
    import sys

    print(f"create benchmark spans not installed: {exc}", file=sys.stderr)
