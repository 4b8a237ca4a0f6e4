# The edge agent's image: `tunnel-agent` alone on a small base (glibc and libgcc only, no shell,
# no package manager), for linux/amd64, linux/arm64 and linux/arm/v7. No eBPF toolchain is
# needed to build it. Build the binaries first, then the image from target/dist:
#   bash scripts/setup.sh && cargo xtask dist
#   docker buildx build -f deploy/agent.Dockerfile \
#     --platform linux/amd64,linux/arm64,linux/arm/v7 \
#     -t ghcr.io/edge-redirector/edge-redirector-agent:0.1.0 target/dist
# (Not built in CI: these machines reach no container registry. A test builds every binary
# this file copies and checks every path it names.)
ARG BASE=gcr.io/distroless/cc-debian12:nonroot
FROM ${BASE}
# Set by buildx per platform: amd64, arm64, arm (+ variant v7).
ARG TARGETARCH
ARG TARGETVARIANT
COPY linux-${TARGETARCH}${TARGETVARIANT}/tunnel-agent /usr/local/bin/tunnel-agent
# The DaemonSet runs it as 65534 with every capability dropped and a read-only root.
USER 65534
ENTRYPOINT ["/usr/local/bin/tunnel-agent"]
