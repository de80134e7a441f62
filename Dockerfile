# Airfleet image: the official Airflow image plus our pinned dependencies and the `airfleet` core
# package. One image serves every Airflow component in docker-compose.yaml.
#
# Baked in:   Python dependencies (requirements.txt under constraints.txt) and the airfleet package
#             (from pyproject.toml + include/), so `import airfleet` and the `airfleet` CLI work in
#             every container, including one-off `docker compose run` containers.
# Not baked:  dags/, plugins/ and policies/ are bind-mounted at run time (docker-compose.yaml), so a
#             DAG or policy change needs no rebuild. include/ is also mounted read-only there, for
#             development only (see the comment on PYTHONPATH in docker-compose.yaml).
FROM apache/airflow:3.3.2-python3.11

LABEL org.opencontainers.image.title="airfleet" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Apache Airflow 3.3.2 with Airfleet (AI-inference cluster lifecycle)"

# bubblewrap: the policy sandbox (policies/README.md); it isolates only where the container may
# create namespaces, and Airfleet reports which. Installed as root; everything after runs as airflow.
USER root
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*

# The base image's default user; pip installs into its ~/.local (the image sets PIP_USER=true),
# never as root. ~/.local/bin is already on PATH, which is where the `airfleet` script lands.
USER airflow

# Dependencies first: this layer is rebuilt only when the pins change. constraints.txt pins
# apache-airflow itself to 3.3.2, the version of the base image, so pip cannot up- or downgrade it.
COPY requirements.txt constraints.txt /opt/airfleet/
RUN pip install --no-cache-dir -r /opt/airfleet/requirements.txt -c /opt/airfleet/constraints.txt

# The core package, installed non-editable into site-packages. setuptools writes build/ and
# *.egg-info next to the sources, and COPY leaves them root-owned, so build from a throw-away copy
# the airflow user owns. The checks at the end fail the build, not the first task: the package
# imports, the CLI is on PATH, and the Celery executor loads (requirements.txt pins the provider
# and a celery it can import: celery 5.7 broke it).
COPY pyproject.toml /opt/airfleet/src/
COPY include/ /opt/airfleet/src/include/
RUN cp -r /opt/airfleet/src /tmp/airfleet-src \
    && pip install --no-cache-dir -c /opt/airfleet/constraints.txt /tmp/airfleet-src \
    && rm -rf /tmp/airfleet-src \
    && python -c "import airfleet" \
    && command -v airfleet \
    && python -c "import airflow.providers.celery.executors.celery_executor"

# Mount point of the `airfleet-keys` volume (the vault key pair). Docker initialises an empty named
# volume from this directory, so the volume starts owned by airflow with mode 0700.
RUN mkdir -p -m 0700 /opt/airflow/keys

# Defaults for containers started without docker-compose.yaml (which sets the same values).
# policies_dir() defaults to a path next to the sources, which does not exist once installed.
ENV AIRFLEET_KEYS_DIR=/opt/airflow/keys \
    AIRFLEET_POLICIES_DIR=/opt/airflow/policies
