# The GreenTrainer image: the API, the migration step and the workers run it with different commands
# (see docker-compose.yml). torch is installed first, from the index TORCH_INDEX names, so that installing the
# project pulls no other build of it:
#   CPU (default):   docker build -t greentrainer .
#   GPU (CUDA 12.8): docker build -t greentrainer-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GT_DATA_DIR=/data \
    GT_MODELS_DIR=/models

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0

COPY pyproject.toml README.md alembic.ini ./
COPY greencore greencore
COPY api api
COPY worker worker
COPY migrations migrations
RUN pip install .

RUN useradd --create-home --uid 1000 greentrainer \
    && mkdir -p /data /models \
    && chown greentrainer /data /models
USER greentrainer
EXPOSE 8000
CMD ["greentrainer", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
