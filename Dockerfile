# The decision server and demo pods. Envoy and Valkey use their upstream images (docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY proto proto
COPY extproc extproc
COPY envoy envoy
COPY policies policies
RUN python -m pip install --no-cache-dir grpcio-tools \
 && python -m pip install --no-cache-dir -e . \
 && python proto/build.py
USER 65532:65532
