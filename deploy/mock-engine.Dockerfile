# airfleet/mock-engine: the mock OpenAI-compatible inference engine (`engine: mock`), a
# stand-in for vLLM/SGLang on CPU-only clusters and in tests (include/airfleet_mock_engine/).
# Build from the repository root:
#   docker build -f deploy/mock-engine.Dockerfile -t airfleet/mock-engine:0.1.0 .
# Run:  docker run -p 8000:8000 airfleet/mock-engine:0.1.0 --model Qwen/Qwen2.5-0.5B-Instruct
FROM python:3.11-slim

LABEL org.opencontainers.image.title="airfleet-mock-engine" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Airfleet mock inference engine: OpenAI-compatible API and vLLM metrics, no GPU, no model"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

# The package needs only starlette and uvicorn; uvloop and httptools are what uvicorn's "auto"
# picks when present (the engine is then as fast as it is in the venv). The versions are the
# ones constraints.txt pins for the venv, with their whole closure, so pip installs exactly
# these; `pip check` fails the build on a conflict, the import on a missing wheel.
RUN pip install --no-cache-dir --only-binary=:all: \
        starlette==1.10.0 uvicorn==0.54.0 uvloop==0.23.0 httptools==0.9.0 \
        anyio==4.16.0 idna==3.20 typing-extensions==4.16.0 click==8.5.1 h11==0.16.0 \
    && pip check \
    && python -c "import starlette, uvicorn, uvloop, httptools"

# An unprivileged user with a fixed numeric id, so `runAsNonRoot: true` can verify it.
RUN groupadd --system --gid 10001 airfleet \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin airfleet

WORKDIR /app
COPY --chown=root:root include/airfleet_mock_engine/ /app/airfleet_mock_engine/
RUN python -m compileall -q /app/airfleet_mock_engine \
    && python -m airfleet_mock_engine --help > /dev/null

USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "airfleet_mock_engine"]
