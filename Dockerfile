# Multi-stage build of the issuer: a release build on Debian bookworm, then a distroless runtime
# (glibc, CA certificates, no shell) running as the unprivileged user 65532. The binary needs no
# files at runtime besides /data (mounted writable by the chart) for the embedded default or the
# .eml mail directory.
#
#   docker build -t issuer .
#   docker run -p 8080:8080 issuer          # the embedded default, as `cargo run`

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin issuer \
    && install -D target/release/issuer /out/issuer

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/issuer /usr/local/bin/issuer
WORKDIR /data
ENV ISSUER_DATA_DIR=/data
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/issuer"]
CMD ["serve"]
