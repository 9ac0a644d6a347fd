#!/usr/bin/env bash
# Generate the Go messages and gRPC stubs from ../../protos into gen/go/llama/... (git-ignored).
# Needs protoc, protoc-gen-go and protoc-gen-go-grpc on PATH:
#   go install google.golang.org/protobuf/cmd/protoc-gen-go@latest
#   go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@latest
# (or Debian/Ubuntu: apt install protobuf-compiler protoc-gen-go protoc-gen-go-grpc)
set -euo pipefail
cd "$(dirname "$0")"
module=github.com/llama-grpc/llama-grpc
protoc -I ../../protos \
  --go_out=. --go_opt=module=$module \
  --go-grpc_out=. --go-grpc_opt=module=$module \
  llama/common/v1/common.proto llama/tokenizer/v1/tokenizer.proto \
  llama/model/v1/model.proto llama/gateway/v1/gateway.proto
echo "generated: $(find gen -name '*.go' | sort | tr '\n' ' ')"
