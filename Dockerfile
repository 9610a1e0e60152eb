# The acsr-metrics image: the worker (default command) and the simulator.
#   docker build -t acsr-metrics:0.1.0 .
#   docker run --rm -e ACSR_BROKER=kafka:9092 -p 6066:6066 acsr-metrics:0.1.0
#   docker run --rm -e ACSR_BROKER=kafka:9092 acsr-metrics:0.1.0 simulate --rate 20
# Settings are ACSR_* environment variables (docs/configuration.md). Runs as uid 10001.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# faust-streaming ships no wheel for Linux: its sdist compiles optional C speedups here,
# so the compiler stays in this stage and out of the final image.
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/acsr
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streams ./streams
RUN /opt/acsr/bin/pip install .

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/acsr acsr
COPY --from=build /opt/acsr /opt/acsr
ENV PATH=/opt/acsr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ACSR_WEB_HOST=0.0.0.0 \
    ACSR_DATA_DIR=/home/acsr/data
USER 10001:10001
WORKDIR /home/acsr
EXPOSE 6066
ENTRYPOINT ["acsr-metrics"]
CMD ["worker"]
