# One image recipe for every program of the workspace:
#   docker build --build-arg PROGRAM=echo-server -t tcp-roles/echo-server:0.1.0 .
# PROGRAM is one of echo-server, square-server, square-client, tunnel, deploy.

FROM rust:1.95-slim-bookworm AS build
ARG PROGRAM=echo-server
# jemalloc, echo-server's allocator, is built with make.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p "${PROGRAM}" --bin "${PROGRAM}" \
    && install -D "target/release/${PROGRAM}" /out/program

# Distroless: no shell, no package manager; runs as an unprivileged user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/program /usr/local/bin/program
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/program"]
