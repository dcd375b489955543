// Validates prometheus-operator resources (ServiceMonitor, PrometheusRule) that kubernetes-validate has no
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
// .spec.endpoints[] / .spec.groups[].rules[] (the field names come from the models' type
// declarations).
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

let ServiceMonitor, PrometheusRule;
try {
  ({ ServiceMonitor } = await import(pathToFileURL(join(models, "ServiceMonitor.js")).href));
  ({ PrometheusRule } = await import(pathToFileURL(join(models, "PrometheusRule.js")).href));
} catch (e) {
  console.error(`ERROR cannot load the prometheus-operator models (run scripts/install-tools.sh): ${e.message}`);
  process.exit(2);
}

// Field names of the specs and their nested objects, read from the models' type
// declarations (generated from the same CRDs as the validators).
function fieldsOf(dts) {
  const text = readFileSync(join(models, dts), "utf8");
  return [...text.matchAll(/^\s+"?([A-Za-z0-9_]+)"?\??:/gm)].map((m) => m[1]);
}
const TOP = ["apiVersion", "kind", "metadata", "spec"];

function unknownKeys(obj, known, where) {
  return Object.keys(obj ?? {})
    .filter((k) => !known.includes(k))
    .map((k) => `${where}.${k}: unknown field`);
}

// Per kind: the model class and the unknown-field checks of its nested objects.
const KINDS = {
  ServiceMonitor: {
    model: ServiceMonitor,
    unknown: (res) => {
      const spec = fieldsOf("ServiceMonitorSpec.d.ts");
      const endpoint = fieldsOf("Endpoint.d.ts");
      return [
        ...unknownKeys(res.spec, spec, ".spec"),
        ...(res.spec?.endpoints ?? []).flatMap((ep, i) =>
          unknownKeys(ep, endpoint, `.spec.endpoints[${i}]`),
        ),
      ];
    },
  },
  PrometheusRule: {
    model: PrometheusRule,
    unknown: (res) => {
      const spec = fieldsOf("PrometheusRuleSpec.d.ts");
      const group = fieldsOf("RuleGroup.d.ts");
      const rule = fieldsOf("Rule.d.ts");
      return [
        ...unknownKeys(res.spec, spec, ".spec"),
        ...(res.spec?.groups ?? []).flatMap((g, i) => [
          ...unknownKeys(g, group, `.spec.groups[${i}]`),
          ...(g.rules ?? []).flatMap((r, j) =>
            unknownKeys(r, rule, `.spec.groups[${i}].rules[${j}]`),
          ),
        ]),
      ];
    },
  },
};

let failed = 0;
for (const res of resources) {
  const name = `${String(res.kind).toLowerCase()}/${res.metadata?.name}`;
  const kind = res.apiVersion === "monitoring.coreos.com/v1" ? KINDS[res.kind] : undefined;
  if (!kind) {
    console.log(`ERROR ${name}: no schema for ${res.apiVersion} ${res.kind}`);
    failed++;
    continue;
  }
  const problems = [...unknownKeys(res, TOP, ""), ...kind.unknown(res)];
  try {
    new kind.model(res).validate();
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
