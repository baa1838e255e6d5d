//! fhirlift's template filters and JSON output on arbitrary values: text, integers, floats and
//! decimals through `date`, `dateTime`, `decimal`, `quantity`, `uuid5`, `required`, the lookup
//! filters, and plain output. Whatever renders must be valid JSON (the templates write JSON);
//! a panic or unparsable output is a finding. Errors are fine: they reject a row.
#![no_main]

use std::sync::{Arc, OnceLock};

use fhirlift::mapping::{Lookups, new_environment};
use libfuzzer_sys::fuzz_target;
use minijinja::{Environment, Value, context};

const FILTERS: [&str; 12] = [
    "{{ v }}",
    "{{ v | date }}",
    "{{ v | dateTime }}",
    "{{ v | dateTime(z) }}",
    "{{ v | decimal }}",
    "{{ v | quantity(\"mg/dL\", comparator=w) }}",
    "{{ v | quantity(w) }}",
    "{{ v | uuid5(w) }}",
    "{{ v | required(\"x\") }}",
    "{{ v | fhir_gender }}",
    "{{ v | us_core_race }}",
    "{{ v | lookup(\"lab_codes\") }}",
];

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../mappings/lookups");
        let mut lookups = Lookups::default();
        for (name, file) in [
            ("sex", "sex.csv"),
            ("race", "race.csv"),
            ("ethnicity", "ethnicity.csv"),
            ("lab_codes", "lab_codes.csv"),
        ] {
            lookups
                .add(name, &std::path::Path::new(dir).join(file))
                .expect("shipped lookup table");
        }
        let mut env = new_environment(Arc::new(lookups));
        for (i, body) in FILTERS.iter().enumerate() {
            env.add_template_owned(format!("f{i}.json.j2"), format!("{{\"x\": {body}}}"))
                .expect("template compiles");
        }
        env
    })
}

fn value(kind: u8, bytes: &[u8]) -> Value {
    let text = || String::from_utf8_lossy(bytes).into_owned();
    let word = || {
        let mut b = [0u8; 8];
        for (d, s) in b.iter_mut().zip(bytes) {
            *d = *s;
        }
        b
    };
    match kind % 6 {
        0 => Value::from(text()),
        1 => Value::from(i64::from_le_bytes(word())),
        2 => Value::from(f64::from_le_bytes(word())),
        3 => match text().parse::<rust_decimal::Decimal>() {
            Ok(d) => fhirlift::mapping::cell_value(&fhirlift::source::Value::Decimal(d)),
            Err(_) => Value::from(()),
        },
        4 => Value::from(bytes.first().is_some_and(|b| b & 1 == 1)),
        _ => Value::from(()),
    }
}

fuzz_target!(|data: &[u8]| {
    let [kind, which, rest @ ..] = data else {
        return;
    };
    // Two values: the filtered one and an argument, split at the first 0x1F.
    let (v, w) = match rest.iter().position(|&b| b == 0x1f) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let v = value(*kind, v);
    let w = value(kind >> 3, w);
    let i = usize::from(*which) % FILTERS.len();
    let env = env();
    let Ok(t) = env.get_template(&format!("f{i}.json.j2")) else {
        return;
    };
    if let Ok(out) = t.render(context! { v => v, w => w, z => "America/Chicago", timezone => "UTC" }) {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&out) {
            panic!("filter {} rendered invalid JSON ({e}): {out}", FILTERS[i]);
        }
    }
});
