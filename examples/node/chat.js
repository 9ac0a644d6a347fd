#!/usr/bin/env node
// Stream a chat answer from the llama-grpc gateway, from Node.js.
//
// Loads the .proto files from protos/ at run time (@grpc/proto-loader): no generated code.
//
//   npm install                                   # once, in the repository root (or `make node`)
//   node examples/node/chat.js "What is the capital of France?"
//   node examples/node/chat.js --address localhost:50050 --temperature 0 --max-new-tokens 64 \
//       --system "Always answer with Haiku" "I am going to Paris, what should I see?"
//   node examples/node/chat.js --temperature 0 --json-schema \
//       '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}' "Where is the Louvre?"
//
// --json-schema asks for structured output: the answer is JSON that validates against the schema
// (constraint.jsonSchema; --regex and --choice work the same way).
//
// The answer streams to stdout; finish reason, token counts and the request id go to stderr.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');

function loadGateway() {
  const definition = protoLoader.loadSync('llama/gateway/v1/gateway.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: false, // lowerCamelCase field names, as in proto JSON and grpcurl
    longs: String,
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).llama.gateway.v1;
}

function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      address: { type: 'string', default: process.env.LLAMA_GATEWAY_ADDRESS || 'localhost:50050' },
      system: { type: 'string' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      seed: { type: 'string' },
      'max-new-tokens': { type: 'string', default: '0' },
      stop: { type: 'string', multiple: true, default: [] },
      timeout: { type: 'string' },
      'json-schema': { type: 'string' },
      regex: { type: 'string' },
      choice: { type: 'string', multiple: true },
    },
  });
  const question = positionals.join(' ') || 'What is the capital of France?';

  const messages = [];
  if (values.system) messages.push({ role: 'system', content: values.system });
  messages.push({ role: 'user', content: question });
  const sampling = {};
  if (values.temperature !== undefined) sampling.temperature = Number(values.temperature);
  if (values['top-p'] !== undefined) sampling.topP = Number(values['top-p']);
  if (values.seed !== undefined) sampling.seed = values.seed;
  const request = {
    messages,
    sampling,
    stopping: { maxNewTokens: Number(values['max-new-tokens']), stopSequences: values.stop },
  };
  if (values['json-schema'] !== undefined) request.constraint = { jsonSchema: values['json-schema'] };
  else if (values.regex !== undefined) request.constraint = { regex: values.regex };
  else if (values.choice !== undefined) request.constraint = { choice: { choices: values.choice } };

  const gateway = loadGateway();
  const client = new gateway.GatewayService(values.address, grpc.credentials.createInsecure());
  const options = {};
  if (values.timeout !== undefined) options.deadline = Date.now() + Number(values.timeout) * 1000;

  const call = client.GenerateStream(request, new grpc.Metadata(), options);
  let requestId = '';
  let last = null;
  call.on('metadata', (metadata) => { requestId = String(metadata.get('x-request-id')[0] || ''); });
  call.on('data', (response) => {
    process.stdout.write(response.text);
    last = response;
  });
  call.on('error', (error) => {
    process.stderr.write(`\nerror: ${grpc.status[error.code]}: ${error.details}\n`);
    process.exitCode = 1;
  });
  call.on('end', () => {
    if (last === null) return;
    const usage = last.usage || { promptTokens: 0, generatedTokens: 0 };
    process.stdout.write('\n');
    process.stderr.write(
      `[${last.finishReason}: ${usage.promptTokens} prompt + ${usage.generatedTokens} generated tokens; ` +
        `request id ${requestId}]\n`,
    );
    client.close();
  });
}

main();
