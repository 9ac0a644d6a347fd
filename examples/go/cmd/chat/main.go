// Command chat streams a chat answer from the llama-grpc gateway.
//
//	./generate.sh && go mod tidy        # once: stubs from ../../protos, then the grpc/protobuf modules
//	go run ./cmd/chat -address localhost:50050 -temperature 0 "What is the capital of France?"
//	go run ./cmd/chat -temperature 0 -json-schema '{"type":"object","properties":{"city":{"type":"string"}}}' \
//	    "Where is the Louvre?"
//
// -json-schema asks for structured output: the answer is JSON that validates against the schema.
//
// The answer streams to stdout; finish reason, token counts and the request id go to stderr.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	commonv1 "github.com/llama-grpc/llama-grpc/gen/go/llama/common/v1"
	gatewayv1 "github.com/llama-grpc/llama-grpc/gen/go/llama/gateway/v1"
)

func main() {
	address := flag.String("address", envOr("LLAMA_GATEWAY_ADDRESS", "localhost:50050"), "gateway host:port")
	system := flag.String("system", "", "system prompt")
	temperature := flag.Float64("temperature", -1, "sampling temperature (0: greedy; unset: the server's 0.6)")
	maxNewTokens := flag.Int("max-new-tokens", 0, "most tokens to generate (0: the server's default)")
	timeout := flag.Duration("timeout", 2*time.Minute, "deadline for the whole answer")
	jsonSchema := flag.String("json-schema", "", "a JSON Schema the answer must validate against (structured output)")
	flag.Parse()
	question := strings.Join(flag.Args(), " ")
	if question == "" {
		question = "What is the capital of France?"
	}

	// grpc.WithInsecure works from grpc-go 1.x's oldest to newest releases (plaintext, like grpcurl -plaintext).
	conn, err := grpc.Dial(*address, grpc.WithInsecure())
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	client := gatewayv1.NewGatewayServiceClient(conn)

	var messages []*commonv1.Message
	if *system != "" {
		messages = append(messages, &commonv1.Message{Role: "system", Content: *system})
	}
	messages = append(messages, &commonv1.Message{Role: "user", Content: question})
	request := &gatewayv1.GenerateStreamRequest{
		Messages: messages,
		Sampling: &commonv1.SamplingParams{},
		Stopping: &commonv1.StoppingCriteria{MaxNewTokens: int32(*maxNewTokens)},
	}
	if *temperature >= 0 {
		request.Sampling.Temperature = proto.Float32(float32(*temperature))
	}
	if *jsonSchema != "" {
		request.Constraint = &commonv1.Constraint{Kind: &commonv1.Constraint_JsonSchema{JsonSchema: *jsonSchema}}
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	stream, err := client.GenerateStream(ctx, request)
	if err != nil {
		fail(err)
	}
	var last *gatewayv1.GenerateStreamResponse
	for {
		response, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail(err)
		}
		fmt.Print(response.GetText())
		last = response
	}
	fmt.Println()
	requestID := ""
	if header, err := stream.Header(); err == nil {
		requestID = strings.Join(header.Get("x-request-id"), ",")
	}
	if last != nil {
		fmt.Fprintf(os.Stderr, "[%s: %d prompt + %d generated tokens; request id %s]\n", last.GetFinishReason(),
			last.GetUsage().GetPromptTokens(), last.GetUsage().GetGeneratedTokens(), requestID)
	}
}

func envOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "\nerror: %v\n", err)
	os.Exit(1)
}
