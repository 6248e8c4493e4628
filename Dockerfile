# csi-dmthin image: `make image` builds it with docker or podman.
#
# The runtime packages come from hack/runtime-packages.txt, the one list the
# e2e image build reads too, so the image CI tests holds what users get.

ARG GO_VERSION=1.26
ARG DEBIAN_RELEASE=bookworm

FROM golang:${GO_VERSION}-${DEBIAN_RELEASE} AS build
ARG VERSION=dev
WORKDIR /src
# Modules first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static: the runtime image has no Go toolchain and the binary must not
# depend on its libc.
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-X main.version=${VERSION}" \
	-o /out/csi-dmthin ./cmd/csi-dmthin

FROM debian:${DEBIAN_RELEASE}-slim
COPY hack/runtime-packages.txt /tmp/runtime-packages.txt
RUN set -eu; \
	pkgs="$(sed -e 's/#.*//' -e 's/[[:space:]]//g' /tmp/runtime-packages.txt | grep -v '^$')"; \
	apt-get update; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
	rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt
COPY --from=build /out/csi-dmthin /usr/bin/csi-dmthin
# LC_ALL=C: the driver parses the output of mkfs and blkid.
ENV LC_ALL=C
ENTRYPOINT ["/usr/bin/csi-dmthin"]
CMD ["serve"]
