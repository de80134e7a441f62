# Two commands for a newcomer: `make run` and `make test`. bin/airfleet-dev does the work.
.PHONY: run run-scale-out test test-fast bench lint setup

run:            ## set up everything and start Airfleet on http://127.0.0.1:8080
	bin/airfleet-dev run

run-scale-out:  ## the same on CeleryExecutor: local PostgreSQL + Redis, 2 Celery workers
	bin/airfleet-dev run --scale-out

test:           ## install what the tests need and run all of them (e2e included)
	bin/airfleet-dev test

test-fast:      ## unit tests only (no Airflow runs, no REST)
	bin/airfleet-dev test -m "not integration and not e2e"

bench:          ## benchmarks: print figures, write tests/benchmarks/results/*.json
	bin/airfleet-dev test tests/benchmarks -m benchmark -s

lint:
	bin/airfleet-dev setup requirements-dev.txt && .venv/bin/ruff check .

setup:
	bin/airfleet-dev setup requirements-dev.txt
