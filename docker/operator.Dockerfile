# syntax=docker/dockerfile:1
# The Warren operator image. It does not link RocksDB. Build from the
# repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/warren-mq/warren-operator:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p warren-operator --bin warren-operator \
 && mkdir -p /out \
 && cp target/release/warren-operator /out/

# TLS to the API server is rustls (ring): no OpenSSL needed at run time.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/warren-operator /usr/local/bin/warren-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/warren-operator"]
