# syntax=docker/dockerfile:1
# imprint-sync container image.
#   docker build -t imprint-sync:dev .
#   docker run --rm imprint-sync:dev check-config
#
# Stage 1: build the release binary from the locked dependency set.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin imprint-sync \
    && install -D -m 0755 target/release/imprint-sync /out/imprint-sync

# Stage 2: distroless runtime (glibc and CA certificates, no shell, no package manager),
# running as the built-in nonroot user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="imprint-sync" \
      org.opencontainers.image.description="Syncs a partner's PostgreSQL outbox to Imprint's API" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/imprint-sync /usr/local/bin/imprint-sync
# The binary reads ./config/default.toml when present (the built-in defaults are identical).
# It lives under the working directory, not /etc/imprint-sync, because deployments mount
# their own configuration over /etc/imprint-sync (Kubernetes ConfigMap, systemd host file).
WORKDIR /usr/local/share/imprint-sync
COPY --chmod=0444 config/default.toml /usr/local/share/imprint-sync/config/default.toml
USER 65532:65532
# The admin server: /livez, /readyz, /metrics. Inside a container, listen on all interfaces.
ENV IMPRINT_SYNC__ADMIN__LISTEN=0.0.0.0:9187
EXPOSE 9187
ENTRYPOINT ["imprint-sync"]
CMD ["run"]
