// A storefront backend the Sluice project did not write: Node.js, @grpc/grpc-js, no deadline
// on any call, and no .proto files of its own. It learns the API from server reflection
// (grpc.reflection.v1), builds its client from the descriptors it got, and decodes rich
// error details (google.rpc.Status, BadRequest) with the descriptors reflection also serves.
//
//   node storefront_client.js HOST:PORT ITEM_ID   -> prints one JSON report on stdout
//   (SLUICE_CA_FILE and SLUICE_API_KEY in the environment: TLS with an API key;
//   SLUICE_CATALOG_KEY: also add an item with CatalogService/UpdateItems and search for it)
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");
const descriptor = require("protobufjs/ext/descriptor");

const [address, itemId] = process.argv.slice(2);
// TLS with the shop's CA and an API key, when given (SLUICE_CA_FILE, SLUICE_API_KEY)
const fs = require("fs");
const apiKey = process.env.SLUICE_API_KEY || "";
const credentials = process.env.SLUICE_CA_FILE
  ? grpc.credentials.combineChannelCredentials(
      grpc.credentials.createSsl(fs.readFileSync(process.env.SLUICE_CA_FILE)),
      grpc.credentials.createFromMetadataGenerator((_params, callback) => {
        const md = new grpc.Metadata();
        if (apiKey) md.set("x-api-key", apiKey);
        callback(null, md);
      }))
  : grpc.credentials.createInsecure();
const LOADER = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

function reflectionClient(version) {
  const file = path.join(
    path.dirname(require.resolve("@grpc/reflection/package.json")),
    "build/proto/grpc/reflection", version, "reflection.proto");
  const def = protoLoader.loadSync(file, LOADER);
  const pkg = grpc.loadPackageDefinition(def).grpc.reflection[version];
  return new pkg.ServerReflection(address, credentials);
}

// One reflection exchange: send the requests, collect the responses.
function reflect(version, requests) {
  return new Promise((resolve, reject) => {
    const call = reflectionClient(version).ServerReflectionInfo();
    const out = [];
    call.on("data", (r) => out.push(r));
    call.on("error", reject);
    call.on("end", () => resolve(out));
    for (const r of requests) call.write(r);
    call.end();
  });
}

async function descriptorSet(symbols) {
  const responses = await reflect("v1", symbols.map((s) => ({ file_containing_symbol: s })));
  const seen = new Map();
  for (const r of responses) {
    if (r.error_response) throw new Error(`reflection: ${r.error_response.error_message}`);
    for (const bytes of r.file_descriptor_response.file_descriptor_proto) {
      const file = descriptor.FileDescriptorProto.decode(bytes);
      seen.set(file.name, file);
    }
  }
  return descriptor.FileDescriptorSet.create({ file: [...seen.values()] });
}

function unary(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, (err, response) => resolve({ err, response }));  // no deadline
  });
}

async function main() {
  const report = {};
  const listed = await reflect("v1", [{ list_services: "" }]);
  report.services_v1 = listed[0].list_services_response.service.map((s) => s.name);
  const listedAlpha = await reflect("v1alpha", [{ list_services: "" }]);
  report.services_v1alpha = listedAlpha[0].list_services_response.service.map((s) => s.name);

  const set = await descriptorSet([
    "sluice.v1.StorefrontService", "google.rpc.Status", "google.rpc.BadRequest"]);
  const encoded = descriptor.FileDescriptorSet.encode(set).finish();
  const def = protoLoader.loadFileDescriptorSetFromBuffer(Buffer.from(encoded), LOADER);
  const Storefront = grpc.loadPackageDefinition(def).sluice.v1.StorefrontService;
  const client = new Storefront(address, credentials);
  const root = protobuf.Root.fromDescriptor(set);
  const Status = root.lookupType("google.rpc.Status");
  const BadRequest = root.lookupType("google.rpc.BadRequest");

  const search = await unary(client, "Search", { query: "shoes", page_size: 5 });
  if (search.err) throw search.err;
  report.search = {
    item_ids: search.response.page.item_ids,
    stages: search.response.stages.map((s) => s.stage),
    next_page_token: search.response.next_page_token,
  };
  const second = await unary(client, "Search", {
    query: "shoes", page_size: 5, page_token: search.response.next_page_token });
  if (second.err) throw second.err;
  report.search_page_2 = second.response.page.item_ids;

  // a typo: the gateway searches the catalog's word and says so in searched_query
  const typo = await unary(client, "Search", { query: "Shoess", page_size: 5 });
  if (typo.err) throw typo.err;
  report.typo = { searched_query: typo.response.searched_query, item_ids: typo.response.page.item_ids };

  if (process.env.SLUICE_CATALOG_KEY) {
    // the merchant's feed: a new item, then a search that finds it (no deadline either)
    const catalogSet = await descriptorSet(["sluice.v1.CatalogService"]);
    const catalogDef = protoLoader.loadFileDescriptorSetFromBuffer(
      Buffer.from(descriptor.FileDescriptorSet.encode(catalogSet).finish()), LOADER);
    const Catalog = grpc.loadPackageDefinition(catalogDef).sluice.v1.CatalogService;
    const catalog = new Catalog(address, credentials);
    const md = new grpc.Metadata();
    md.set("x-api-key", process.env.SLUICE_CATALOG_KEY);
    const call = (request, metadata) => new Promise((resolve) => {
      catalog.UpdateItems(request, metadata, (err, response) => resolve({ err, response }));
    });
    const newId = String(9000000 + (Date.now() % 100000));
    const created = await call({ updates: [{ item: {
      item_id: newId, title: "Frobnitz node lantern", description: "A lantern for nodes.",
      brand: "Frobnitz", price_cents: 1999, in_stock: true } }] }, md);
    if (created.err) throw created.err;
    const unauthenticated = await call({ updates: [{ item: { item_id: newId, title: "x" } }] },
      new grpc.Metadata());
    const badMask = await call({ updates: [{ item: { item_id: newId },
      update_mask: { paths: ["item_id"] } }] }, md);
    // every process reads the update log within a poll interval: look for up to 5 s
    const began = Date.now();
    let found;
    for (;;) {
      found = await unary(client, "Search", { query: "frobnitz lantern", page_size: 5 });
      if (found.err) throw found.err;
      if (found.response.page.item_ids.includes(newId) || Date.now() - began > 5000) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    // a word only the new item uses (SLUICE_LIVE_WORD, one typo from a catalog word): the
    // gateway learned it from the update, so it is searched as typed, not corrected away
    const liveWord = process.env.SLUICE_LIVE_WORD || "frobnitz";
    const worded = await call({ updates: [{ item: { item_id: newId,
      title: `Frobnitz node lantern ${liveWord}` } }] }, md);
    if (worded.err) throw worded.err;
    const kept = await unary(client, "Search", { query: `${liveWord} lantern`, page_size: 5 });
    if (kept.err) throw kept.err;
    const violations = Status.decode(badMask.err.metadata.get("grpc-status-details-bin")[0])
      .details.filter((any) => any.type_url.endsWith("google.rpc.BadRequest"))
      .flatMap((any) => BadRequest.decode(any.value).field_violations.map((v) => v.field));
    report.catalog = {
      item_id: newId,
      created: created.response.created_count,
      unauthenticated: grpc.status[unauthenticated.err.code],
      bad_mask: [grpc.status[badMask.err.code], violations],
      search: found.response.page.item_ids,
      live_word_searched: kept.response.searched_query,
      visible_after_ms: Date.now() - began,
    };
    catalog.close();
  }

  // a search session: the follow-up refines the first page instead of starting over
  const session = `node-session-${Date.now()}`;
  const opening = await unary(client, "Search", { query: "shoes", page_size: 5, session_id: session });
  if (opening.err) throw opening.err;
  const followUp = await unary(client, "Search", {
    query: "cheaper", page_size: 5, session_id: session });
  if (followUp.err) throw followUp.err;
  report.session = {
    first: opening.response.page.item_ids,
    first_turn: opening.response.refinement.turn,
    refined: followUp.response.page.item_ids,
    refinement: followUp.response.refinement,
    searched_query: followUp.response.searched_query,
  };

  const similar = await unary(client, "Recommend", {
    surface: "SURFACE_SIMILAR_ITEMS", context_item_id: itemId, page_size: 4 });
  if (similar.err) throw similar.err;
  report.similar = similar.response.page.item_ids;

  // the shopper's view: reasons, and no internals (enum names as the reflected protos give)
  const basic = await unary(client, "Recommend", {
    surface: "SURFACE_SIMILAR_ITEMS", context_item_id: itemId, page_size: 4,
    view: "PAGE_VIEW_BASIC", include_blurbs: true });
  if (basic.err) throw basic.err;
  report.basic = {
    item_ids: basic.response.page.item_ids,
    reasons: basic.response.page.reasons.map((r) => [r.code, r.evidence_item_ids]),
    sources: basic.response.page.sources,
    blurbs: basic.response.page.blurbs,
  };

  const tracked = await unary(client, "Track", { events: [{
    event_id: `node-${Date.now()}`, user_id: "node-shopper", item_id: itemId,
    type: "EVENT_TYPE_CLICK" }] });
  if (tracked.err) throw tracked.err;
  report.track = tracked.response.statuses;

  const bad = await unary(client, "Search", { query: "shoes", page_size: 0 });
  const details = bad.err.metadata.get("grpc-status-details-bin")[0];
  const status = Status.decode(details);
  report.error = {
    code: grpc.status[bad.err.code],
    details: status.details.map((any) => any.type_url),
    field_violations: status.details
      .filter((any) => any.type_url.endsWith("google.rpc.BadRequest"))
      .flatMap((any) => BadRequest.decode(any.value).field_violations.map((v) => v.field)),
    request_id: bad.err.metadata.get("x-request-id")[0] || "",
  };
  process.stdout.write(JSON.stringify(report) + "\n");
  client.close();
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
