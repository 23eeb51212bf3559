#!/bin/sh
# The digest each base image tag of the Dockerfiles has now (its multi-platform index), from the
# registry, with `crane digest` or else `docker buildx imagetools inspect`; needs the registry.
#   sh hack/base_image_digests.sh           prints IMAGE DIGEST for each Dockerfile's default image
#   sh hack/base_image_digests.sh --write   also makes it the default of the Dockerfile's digest ARG
# The CUDA image's digest (docs/first-deployment.md, worker/Dockerfile's comment):
#   sh hack/base_image_digests.sh nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
set -eu
cd "$(dirname "$0")/.."

digest() {
  if command -v crane >/dev/null; then
    crane digest "$1"
  else
    docker buildx imagetools inspect --format '{{.Manifest.Digest}}' "$1"
  fi
}

case "${1:-}" in
  ""|--write) ;;
  -*) echo "usage: $0 [--write | IMAGE...]" >&2; exit 2 ;;
  *) for image in "$@"; do echo "$image $(digest "$image")"; done; exit 0 ;;
esac

for pair in operator/Dockerfile:PYTHON worker/Dockerfile:BASE; do
  file=${pair%%:*} arg=${pair#*:}
  image=$(sed -n "s/^ARG ${arg}_IMAGE=//p" "$file")
  sum=$(digest "$image")
  case "$sum" in sha256:[0-9a-f]*) ;; *) echo "$image: no digest ($sum)" >&2; exit 1 ;; esac
  echo "$image $sum"
  if [ "${1:-}" = --write ]; then
    sed -i "s/^ARG ${arg}_DIGEST=.*/ARG ${arg}_DIGEST=${sum}/" "$file"
  fi
done
