// A two-turn conversation with the sinkserve gateway over one bidirectional stream.
//
//   node chat.js [host:port] [token] [session_id]
//
// Defaults: 127.0.0.1:50051, $SINKSERVE_TOKEN, a new session. With a session id it resumes
// that session (sending it as `x-session-id` metadata too, which a proxy routes by).
// Prints the streamed replies, then one JSON line summarising the turns.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const definition = protoLoader.loadSync(path.join(PROTO_ROOT, "sinkserve/v1/chat.proto"), {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { ChatService } = grpc.loadPackageDefinition(definition).sinkserve.v1;

const target = process.argv[2] || "127.0.0.1:50051";
const token = process.argv[3] || process.env.SINKSERVE_TOKEN || "";
const resumeId = process.argv[4] || "";
const questions = ["What is the capital of France?", "And what is it famous for?"];

const client = new ChatService(target, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
if (token) metadata.add("authorization", `Bearer ${token}`);
if (resumeId) metadata.add("x-session-id", resumeId);

const call = client.Chat(metadata, { deadline: Date.now() + 120_000 });
const turns = [];
let reply = "";
let sessionId = "";
let resumed = false;

function ask(i) {
  process.stdout.write(`> ${questions[i]}\n`);
  call.write({ turn: { text: questions[i], sampling: { max_tokens: 32 } } });
}

call.on("data", (response) => {
  switch (response.event) {
    case "session_opened":
      ({ session_id: sessionId, resumed } = response.session_opened);
      ask(0);
      break;
    case "delta":
      reply += response.delta.text;
      process.stdout.write(response.delta.text);
      break;
    case "turn_end": {
      const { finish_reason, usage } = response.turn_end;
      process.stdout.write("\n");
      turns.push({ text: reply, finish_reason, usage });
      reply = "";
      if (turns.length < questions.length) ask(turns.length);
      else call.end(); // half-close: the session stays and can be resumed
      break;
    }
  }
});

call.on("error", (err) => {
  console.error(`error: ${grpc.status[err.code]}: ${err.details}`);
  process.exitCode = 1;
});

call.on("end", () => {
  console.log(JSON.stringify({ session_id: sessionId, resumed, turns }));
  client.close();
  if (turns.length !== questions.length) process.exitCode = 1;
});

call.write(
  resumeId
    ? { resume: { session_id: resumeId } }
    : { open: { system_prompt: "You are a concise assistant." } },
);
