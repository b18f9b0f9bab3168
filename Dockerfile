# Image for both services (compose.yaml picks the command). Exact versions from
# requirements/constraints.txt, the same ones `make` installs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

COPY requirements/constraints.txt requirements/constraints.txt
COPY pyproject.toml README.md ./
COPY imagetraining imagetraining
COPY control_service control_service
COPY discovery_worker discovery_worker
RUN pip install -c requirements/constraints.txt . \
    && useradd --create-home --uid 10001 --user-group imagetraining

# Non-root: the services only read the library (mounted read-only) and talk to PostgreSQL.
USER imagetraining

EXPOSE 50051 50052
# Settings come from the environment (DATABASE_URL, IMAGETRAINING_*); see README.md.
CMD ["python", "-m", "control_service"]
