#!/usr/bin/env bash
# Fetches what the GPU machine lacks (it has no network): Python 3.12 wheels into .whl/ and
# Debian's runc and etcd packages into .deb/. Both folders are git-ignored and carried.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl .deb
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64)
pkgs=(aetcd==1.0.0 starlette==1.10.0 uvicorn==0.54.0 grpcio==1.85.1 grpcio-health-checking==1.85.1
      grpcio-reflection==1.85.1 protobuf==7.36.2 openai==3.54.0 distro jiter httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 sniffio pydantic pydantic-core
      annotated-types typing-inspection prometheus_client==0.26.0 pytest-asyncio==1.5.0 transformers==5.23.0 huggingface_hub==2.4.0
      asgiref==3.13.0 googleapis-common-protos==1.76.0 opentelemetry-api==1.45.1 opentelemetry-sdk==1.45.1
      opentelemetry-exporter-otlp-common==0.66b1 opentelemetry-exporter-otlp-proto-common==1.45.1
      opentelemetry-exporter-otlp-proto-grpc==1.45.1 opentelemetry-instrumentation==0.66b1
      opentelemetry-instrumentation-asgi==0.66b1 opentelemetry-instrumentation-grpc==0.66b1
      opentelemetry-instrumentation-starlette==0.66b1 opentelemetry-proto==1.45.1
      opentelemetry-semantic-conventions==0.66b1 opentelemetry-util-http==0.66b1 wrapt==2.5.2 typing_extensions==4.16.0
      fastapi==0.165.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl "${pkgs[@]}"
(cd .deb && apt-get download runc etcd-server golang-github-containers-common libseccomp2 skopeo umoci \
  libdevmapper1.02.1 libgpgme11 libassuan0 >/dev/null)
ls .whl .deb
