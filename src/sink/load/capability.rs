//! Reading a target's CapabilityStatement: what it supports, and whether a configuration's
//! resource types and options can work against it. Pure: the caller fetches the statement.

use std::fmt;

use serde_json::Value;

/// One finding of `check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub what: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "  {} {}", if self.ok { "ok " } else { "NO " }, self.what)
    }
}

/// What the statement says, measured against what the loader needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub software: String,
    pub fhir_version: String,
    pub findings: Vec<Finding>,
}

impl Assessment {
    /// Whether every finding is satisfied.
    pub fn can_work(&self) -> bool {
        self.findings.iter().all(|f| f.ok)
    }
}

/// Checks `statement` for the interactions the loader uses on each of `types` (create, update,
/// search by `identifier`; for Patient also `_security` when a CRID is used) and, when
/// `bundles`, transaction support.
pub fn assess(
    statement: &Value,
    types: &[String],
    patient_by_crid: bool,
    bundles: bool,
) -> Assessment {
    let software = statement
        .pointer("/software/name")
        .and_then(Value::as_str)
        .or_else(|| statement.get("publisher").and_then(Value::as_str))
        .unwrap_or("unnamed server")
        .to_string();
    let fhir_version = statement
        .get("fhirVersion")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    let mut findings = vec![Finding {
        ok: statement.get("resourceType").and_then(Value::as_str) == Some("CapabilityStatement")
            && fhir_version.starts_with("4.0"),
        what: format!("FHIR version {fhir_version} (R4 4.0.x needed)"),
    }];
    let rest = statement
        .get("rest")
        .and_then(Value::as_array)
        .and_then(|r| {
            r.iter()
                .find(|x| x.get("mode").and_then(Value::as_str) == Some("server"))
        });
    let codes = |v: Option<&Value>, key: &str| -> Vec<String> {
        v.and_then(|v| v.get(key))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| {
                i.get("code")
                    .or_else(|| i.get("name"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect()
    };
    let common_params = codes(rest, "searchParam");
    for t in types {
        let res = rest
            .and_then(|r| r.get("resource"))
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .find(|x| x.get("type").and_then(Value::as_str) == Some(t))
            });
        let Some(res) = res else {
            findings.push(Finding {
                ok: false,
                what: format!("{t}: not offered by the server"),
            });
            continue;
        };
        let interactions = codes(Some(res), "interaction");
        let params = codes(Some(res), "searchParam");
        let mut missing: Vec<&str> = ["create", "update", "search-type"]
            .into_iter()
            .filter(|i| !interactions.iter().any(|x| x == i))
            .collect();
        let mut needed_params = vec!["identifier"];
        if t == "Patient" && patient_by_crid {
            needed_params.push("_security");
        }
        for p in needed_params {
            // `_security` is a parameter of every resource; servers may list it once, for all.
            let listed = params.iter().chain(&common_params).any(|x| x == p)
                || (p == "_security" && params.is_empty());
            if !listed {
                missing.push(p);
            }
        }
        findings.push(Finding {
            ok: missing.is_empty(),
            what: if missing.is_empty() {
                format!("{t}: create, update, search by identifier")
            } else {
                format!("{t}: missing {}", missing.join(", "))
            },
        });
    }
    if bundles {
        let has = codes(rest, "interaction")
            .iter()
            .any(|c| c == "transaction");
        findings.push(Finding {
            ok: has,
            what: if has {
                "transaction Bundles (for --bundle-size)".into()
            } else {
                "transaction Bundles not offered: use single requests (--bundle-size 0)".into()
            },
        });
    }
    Assessment {
        software,
        fhir_version,
        findings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn statement(transaction: bool) -> Value {
        json!({
            "resourceType": "CapabilityStatement",
            "fhirVersion": "4.0.1",
            "software": {"name": "demo"},
            "rest": [{
                "mode": "server",
                "interaction": if transaction { json!([{"code": "transaction"}]) } else { json!([]) },
                "resource": [
                    {"type": "Patient", "interaction": [{"code": "create"}, {"code": "update"}, {"code": "search-type"}],
                     "searchParam": [{"name": "identifier"}, {"name": "_security"}]},
                    {"type": "Observation", "interaction": [{"code": "create"}, {"code": "search-type"}],
                     "searchParam": [{"name": "identifier"}]},
                ]
            }]
        })
    }

    #[test]
    fn finds_what_is_missing() {
        let types = vec![
            "Patient".to_string(),
            "Observation".to_string(),
            "Medication".to_string(),
        ];
        let a = assess(&statement(false), &types, true, true);
        assert!(!a.can_work());
        let text: Vec<String> = a.findings.iter().map(|f| f.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("Observation: missing update")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.contains("Medication: not offered")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.contains("NO  transaction")),
            "{text:?}"
        );
        let ok = assess(&statement(true), &types[..1], true, true);
        assert!(ok.can_work(), "{ok:?}");
        assert_eq!(ok.software, "demo");
    }
}
