-- Mounted into /docker-entrypoint-initdb.d by docker-compose.yaml. The postgres image runs it once,
-- as POSTGRES_USER (`airflow`), when the postgres-data volume is first initialised; it does not run
-- against an existing volume (there: `docker compose exec postgres createdb -U airflow airfleet`).
--
-- Airflow's metadata stays in POSTGRES_DB (`airflow`); Airfleet's store gets its own database on
-- the same server, so the two schemas and their Alembic histories never mix. Airfleet creates its
-- tables itself (`airfleet db migrate`, run by the airflow-init service).
CREATE DATABASE airfleet OWNER airflow;
