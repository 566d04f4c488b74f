# syntax=docker/dockerfile:1
# The Warren broker image: warren-broker, plus warrenctl for debugging and
# simple consumers. Build from the repository root:
#   docker build -f docker/broker.Dockerfile -t ghcr.io/warren-mq/warren-broker:0.1.0 .

FROM rust:1.95-bookworm AS build
# librocksdb-sys compiles RocksDB (C++) and generates bindings with libclang.
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p warren-broker -p warren-client --bins \
 && mkdir -p /out/bin /out/data \
 && cp target/release/warren-broker target/release/warrenctl /out/bin/

# distroless/cc: glibc, libgcc and libstdc++ (RocksDB), no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build --chown=65532:65532 /out/data /var/lib/warren
ENV WARREN_DATA_DIR=/var/lib/warren \
    WARREN_GRPC_ADDR=[::]:5680 \
    WARREN_HTTP_ADDR=[::]:15680
USER 65532:65532
EXPOSE 5680 5681 15680
VOLUME ["/var/lib/warren"]
ENTRYPOINT ["/usr/local/bin/warren-broker"]
