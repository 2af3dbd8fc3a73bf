// A tunebus client in Node.js, written from the README's "Writing a client" and contracts/ alone:
// upload a dataset, submit a training job, follow it to its end, download its adapter and check
// every file's sha256.
//
//   node client.mjs --dataset facts.jsonl --adapter speller --base-model s3://tunebus-models/tiny \
//       [--job-id job-1] [--hyperparameters '{"iters": 20}'] [--out ./adapter] [--timeout 600]
//
// NATS: TUNEBUS_NATS_URL, TUNEBUS_NATS__USER, TUNEBUS_NATS__PASSWORD (the submitter role).
// S3 (the dataset upload only): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
// AWS_ENDPOINT_URL_S3, or the TUNEBUS_S3__ACCESS_KEY / __SECRET_KEY / __REGION / __ENDPOINT the
// tunebus tools read. The adapter comes through the registry's presigned links: no S3 key needed.
//
// Prints one JSON line per event, then a summary line {"summary": {...}}; exits 0 when the job
// ended with adapter.registered and every downloaded file matched its sha256.

import { createHash, randomUUID } from "node:crypto";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { parseArgs } from "node:util";

import { PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect, createInbox, nanos } from "@nats-io/transport-node";

// The contract (README "Writing a client", contracts/asyncapi, contracts/schemas).
const TRAINING_REQUESTED = "tunebus.v1.training.requested";
const DOWNLOAD_URL = "tunebus.v1.registry.download-url";
const EVENTS_STREAM = "TUNEBUS_EVENTS";
const DEAD_LETTER_STREAM = "TUNEBUS_DEADLETTER";
const FINAL_TYPES = new Set([
  "tunebus.dataset.rejected.v1",
  "tunebus.training.failed.v1",
  "tunebus.training.cancelled.v1",
  "tunebus.adapter.registered.v1",
  "tunebus.deadletter.v1",
]);

const { values: args } = parseArgs({
  options: {
    dataset: { type: "string" },
    adapter: { type: "string" },
    "base-model": { type: "string" },
    "job-id": { type: "string" },
    hyperparameters: { type: "string", default: "{}" },
    out: { type: "string", default: "./adapter" },
    timeout: { type: "string", default: "600" },
  },
});
for (const required of ["dataset", "adapter", "base-model"]) {
  if (!args[required]) fail(`--${required} is required`);
}
const env = process.env;
const jobId = args["job-id"] ?? `node-${randomUUID().slice(0, 12)}`;
const say = (record) => console.log(JSON.stringify(record));

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

// -- S3: upload the dataset where the submitter may write (s3://<datasets>/uploads/...)

async function uploadDataset(path) {
  const s3 = new S3Client({
    endpoint: env.AWS_ENDPOINT_URL_S3 ?? env.TUNEBUS_S3__ENDPOINT,
    region: env.AWS_REGION ?? env.TUNEBUS_S3__REGION ?? "us-east-1",
    credentials: {
      accessKeyId: env.AWS_ACCESS_KEY_ID ?? env.TUNEBUS_S3__ACCESS_KEY,
      secretAccessKey: env.AWS_SECRET_ACCESS_KEY ?? env.TUNEBUS_S3__SECRET_KEY,
    },
    forcePathStyle: true, // http://host:port/bucket/key: local endpoints have no bucket DNS names
  });
  const bucket = env.TUNEBUS_S3__DATASETS_BUCKET ?? "tunebus-datasets";
  const key = `uploads/${jobId}/${basename(path)}`;
  await s3.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: await readFile(path) }));
  return `s3://${bucket}/${key}`;
}

// -- NATS: the submitter's user and password; replies come to its own inbox prefix

const nc = await connect({
  servers: (env.TUNEBUS_NATS_URL ?? "nats://127.0.0.1:4222").split(","),
  user: env.TUNEBUS_NATS__USER,
  pass: env.TUNEBUS_NATS__PASSWORD,
  inboxPrefix: `_INBOX.${env.TUNEBUS_NATS__USER}`, // a role may subscribe to its own inbox only
  name: "tunebus-node-example",
});
const js = jetstream(nc);
const jsm = await jetstreamManager(nc);

/** An ephemeral push consumer set up as an ordered consumer (no acks, flow control, heartbeats,
 * in memory) delivering to our inbox: the roles may create unnamed consumers only. */
async function follow(stream, start) {
  const deliver_subject = createInbox(`_INBOX.${env.TUNEBUS_NATS__USER}`);
  const idle_heartbeat = nanos(5_000);
  await jsm.consumers.add(stream, {
    deliver_subject, idle_heartbeat, flow_control: true, ack_policy: AckPolicy.None,
    mem_storage: true, num_replicas: 1, inactive_threshold: nanos(60_000), ...start,
  });
  const consumer = await js.consumers.getBoundPushConsumer({ deliver_subject, idle_heartbeat });
  return consumer.consume();
}

async function submitAndFollow(datasetUri) {
  const request = {
    job_id: jobId,
    adapter_name: args.adapter,
    base_model: args["base-model"],
    dataset: { uri: datasetUri },
    hyperparameters: JSON.parse(args.hyperparameters),
  };
  const type = "tunebus.training.requested.v1";
  const event = {
    specversion: "1.0", id: randomUUID(), source: "tunebus/node-example", type,
    subject: jobId, time: new Date().toISOString(), datacontenttype: "application/json",
    dataschema: `urn:tunebus:schema:${type}`, data: request,
  };
  const submittedAt = new Date();
  // Nats-Msg-Id: a retried publish of the same event is stored once (the stream's dedup
  // window); the job_id makes a second event for the same job a duplicate (or a refusal).
  const ack = await js.publish(TRAINING_REQUESTED, JSON.stringify(event), { msgID: event.id });
  say({ published: TRAINING_REQUESTED, job_id: jobId, stream: ack.stream, seq: ack.seq, duplicate: ack.duplicate });

  // Follow from the request's own sequence: nothing older is read.
  const events = await follow(EVENTS_STREAM, { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: ack.seq });
  const dead = await follow(DEAD_LETTER_STREAM, {
    deliver_policy: DeliverPolicy.StartTime, opt_start_time: new Date(submittedAt - 1000).toISOString(),
  });
  const timeout = setTimeout(() => { events.stop(); dead.stop(); }, Number(args.timeout) * 1000);
  try {
    const ending = await Promise.race([firstFinal(events, event.id), firstFinal(dead, event.id)]);
    if (!ending) fail(`job ${jobId} did not end within ${args.timeout}s`);
    return ending;
  } finally {
    clearTimeout(timeout);
    events.stop();
    dead.stop();
  }
}

async function firstFinal(messages, requestId) {
  for await (const m of messages) {
    let event;
    try { event = m.json(); } catch { continue; }
    if (event.subject !== jobId) continue; // another job's event
    say({ event: event.type, subject: m.subject, seq: m.seq });
    if (FINAL_TYPES.has(event.type)) return event;
    // Our request was refused (the job id was taken): it started nothing, so we are done.
    if (event.type === "tunebus.training.refused.v1" && event.data.event_id === requestId) return event;
  }
  return null;
}

// -- the adapter, through the registry's presigned links, every file checked

async function download(ref, outDir) {
  const reply = await nc.request(DOWNLOAD_URL, JSON.stringify({ ref }), { timeout: 10_000 });
  const urls = reply.json();
  if (urls.error) throw new Error(`registry: ${urls.error}`);
  const files = {};
  for (const [name, url] of Object.entries(urls.urls)) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`GET ${name}: HTTP ${response.status}`);
    const body = Buffer.from(await response.arrayBuffer());
    const sha256 = createHash("sha256").update(body).digest("hex");
    if (sha256 !== urls.sha256[name]) throw new Error(`${name}: sha256 ${sha256}, registry says ${urls.sha256[name]}`);
    await mkdir(dirname(join(outDir, name)), { recursive: true });
    await writeFile(join(outDir, name), body);
    files[name] = sha256;
  }
  return { ref: urls.ref, format: urls.format, files };
}

let code = 1;
try {
  const datasetUri = await uploadDataset(args.dataset);
  say({ uploaded: datasetUri });
  const ending = await submitAndFollow(datasetUri);
  const summary = { job_id: jobId, final: ending.type };
  if (ending.type === "tunebus.adapter.registered.v1") {
    Object.assign(summary, await download(ending.data.entry.ref, args.out));
    code = 0;
  } else {
    summary.reason = ending.data.reason ?? ending.data.error ?? null;
  }
  say({ summary });
} finally {
  await nc.drain();
}
process.exit(code);
