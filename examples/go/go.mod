// The module path mirrors the protos' go_package prefix, so the generated packages
// (gen/go/llama/...) resolve inside this module without edits. `go mod tidy` fills in
// google.golang.org/grpc and google.golang.org/protobuf.
module github.com/llama-grpc/llama-grpc

go 1.19
