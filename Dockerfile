# One image recipe for every program of the workspace:
#   docker build --build-arg PROGRAM=echo-server -t tcp-roles/echo-server:0.1.0 .
# PROGRAM is one of echo-server, square-server, square-client, tunnel, deploy.
#
# Base images are pinned by digest (multi-platform indexes), so a build
# today and a build next year start from the same bytes. To move to newer
# ones: docker buildx imagetools inspect rust:1.95-slim-bookworm (and the
# runtime image), and replace the digests.

FROM rust:1.95-slim-bookworm@sha256:b8ecdb97c5b9c1ae058249f72710dbe33d4da19f7b8d911bd3c72e5f048af251 AS build
ARG PROGRAM=echo-server
# jemalloc, echo-server's allocator, is built with make.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p "${PROGRAM}" --bin "${PROGRAM}" \
    && install -D -m 0555 "target/release/${PROGRAM}" /out/program

# Distroless: no shell, no package manager. The program is owned by root
# and read-only; it runs as an unprivileged user, writes nothing to its
# root filesystem (the manifests mount it read-only), and works from /.
# Kubernetes probes the program itself (readiness and liveness in the
# manifests), which a Docker HEALTHCHECK cannot do in an image without a
# shell or client tools.
# checkov:skip=CKV_DOCKER_2:the manifests' probes check health; distroless has no tool a HEALTHCHECK could run
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=build --chown=0:0 /out/program /usr/local/bin/program
WORKDIR /
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/program"]
