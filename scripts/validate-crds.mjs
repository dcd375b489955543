// Validates prometheus-operator resources (ServiceMonitor) that kubernetes-validate has no
// schema for, with the validators that @kubernetes-models/prometheus-operator generates
// from the prometheus-operator CRDs (installed by scripts/install-tools.sh into
// .tools/node).
//
//   node scripts/validate-crds.mjs resources.json
//
// The input is a JSON array of Kubernetes objects. Exits 1 if any object is invalid or of
// a kind this script does not know.
//
// Note: these validators check types, enums, patterns and required fields; like the API
// server's CRD handling (which prunes unknown fields), they do not reject unknown fields,
// so this script additionally rejects unknown fields at the top, in .spec and in
// .spec.endpoints[] (the field names come from the models' type declarations).
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const models = join(
  root,
  ".tools/node/node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
);

const file = process.argv[2];
if (!file) {
  console.error("usage: node scripts/validate-crds.mjs resources.json");
  process.exit(2);
}
const resources = JSON.parse(readFileSync(file, "utf8"));

let ServiceMonitor;
try {
  ({ ServiceMonitor } = await import(pathToFileURL(join(models, "ServiceMonitor.js")).href));
} catch (e) {
  console.error(`ERROR cannot load the prometheus-operator models (run scripts/install-tools.sh): ${e.message}`);
  process.exit(2);
}

// Field names of the ServiceMonitor spec and of its endpoints, read from the models' type
// declarations (generated from the same CRD as the validators).
function fieldsOf(dts) {
  const text = readFileSync(join(models, dts), "utf8");
  return [...text.matchAll(/^\s+"?([A-Za-z0-9_]+)"?\??:/gm)].map((m) => m[1]);
}
const KNOWN = {
  top: ["apiVersion", "kind", "metadata", "spec"],
  spec: fieldsOf("ServiceMonitorSpec.d.ts"),
  endpoint: fieldsOf("Endpoint.d.ts"),
};

function unknownKeys(obj, known, where) {
  return Object.keys(obj ?? {})
    .filter((k) => !known.includes(k))
    .map((k) => `${where}.${k}: unknown field`);
}

let failed = 0;
for (const res of resources) {
  const name = `${String(res.kind).toLowerCase()}/${res.metadata?.name}`;
  if (res.apiVersion !== "monitoring.coreos.com/v1" || res.kind !== "ServiceMonitor") {
    console.log(`ERROR ${name}: no schema for ${res.apiVersion} ${res.kind}`);
    failed++;
    continue;
  }
  const problems = [
    ...unknownKeys(res, KNOWN.top, ""),
    ...unknownKeys(res.spec, KNOWN.spec, ".spec"),
    ...(res.spec?.endpoints ?? []).flatMap((ep, i) =>
      unknownKeys(ep, KNOWN.endpoint, `.spec.endpoints[${i}]`),
    ),
  ];
  try {
    new ServiceMonitor(res).validate();
  } catch (e) {
    problems.push(e.message);
  }
  if (problems.length) {
    console.log(`ERROR ${name} did not validate against monitoring.coreos.com/v1: ${problems.join("; ")}`);
    failed++;
  } else {
    console.log(`INFO ${name} passed against monitoring.coreos.com/v1 (prometheus-operator models)`);
  }
}
process.exit(failed ? 1 : 0);
