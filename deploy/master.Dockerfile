# The master image: `redirector` (the eBPF object is embedded in it) and `tunnel` (server, CA,
# tokens), for linux/amd64 and linux/arm64. The master DaemonSet runs both, each with the
# privileges of its own container. Build the binaries first (the eBPF toolchain is needed for
# `redirector`), then the image from target/dist:
#   bash scripts/setup.sh && cargo xtask dist --master --platform linux-amd64
#   # arm64 masters: also `cargo xtask dist --master --platform linux-arm64`
#   docker buildx build -f deploy/master.Dockerfile --platform linux/amd64,linux/arm64 \
#     -t ghcr.io/edge-redirector/edge-redirector:0.1.0 target/dist
# (Not built in CI: these machines reach no container registry. A test builds every binary
# this file copies for linux/amd64 and checks every path it names.)
ARG BASE=debian:12-slim
FROM ${BASE}
ARG TARGETARCH
ARG TARGETVARIANT
COPY linux-${TARGETARCH}${TARGETVARIANT}/redirector linux-${TARGETARCH}${TARGETVARIANT}/tunnel /usr/local/bin/
USER 0
ENTRYPOINT []
