//! The CIBMTR Reporting IG's rules on top of R4: the center's security label, the CRID identifier
//! and no personal data on a Patient, and for a lab Observation a LOINC code, a Patient subject, an
//! effective time with a time zone, a UCUM quantity or a coded value, and a reference range on
//! CMV quantities. It must not repeat the R4 structure checks (`r4.rs` does those) and never names
//! a value in a message (identifiers and results are patient data).

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use crate::resource::json::{Node as Value, Object as Map};

use super::r4::{Ctx, root_name};
use super::{CibmtrRules, Issue, PRIORITY_LOINC_CSV, Severity};
use crate::resource::CRID_PENDING;

pub(super) const LOINC: &str = "http://loinc.org";
pub(super) const UCUM: &str = "http://unitsofmeasure.org";
pub(super) const OBSERVATION_CATEGORY: &str =
    "http://terminology.hl7.org/CodeSystem/observation-category";
pub(super) const US_SSN: &str = "http://hl7.org/fhir/sid/us-ssn";
const V2_IDENTIFIER_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
/// The IG's limit on transaction size.
pub(super) const MAX_BUNDLE_ENTRIES: usize = 50;

/// Vital signs the IG FAQ allows with `valueQuantity` only (body height, body weight).
const QUANTITY_ONLY: &[&str] = &["8302-2", "29463-7"];

/// CMV codes outside the priority list that also need a reference range when sent as a
/// quantity, each checked against its LOINC entry: 5000-5 (Cytomegalovirus DNA in Specimen by NAA,
/// a common lab order code), 54163-1 (Cytomegalovirus DNA [#/volume] in Urine, detection limit
/// 200 copies/mL), 101816-7 (Cytomegalovirus DNA [Units/volume] (viral load) in Urine by NAA).
const EXTRA_CMV_LOINC: &[&str] = &["5000-5", "54163-1", "101816-7"];

struct PriorityList {
    codes: Arc<HashSet<String>>,
    /// Codes whose display names Cytomegalovirus.
    cmv: HashSet<String>,
}

static PRIORITY: LazyLock<PriorityList> = LazyLock::new(|| {
    let mut codes = HashSet::new();
    let mut cmv: HashSet<String> = EXTRA_CMV_LOINC.iter().map(|s| (*s).to_owned()).collect();
    // The list ships inside the binary and a test pins its size, so a malformed line would be
    // caught before release; skipping one here keeps library code free of panics.
    let mut reader = csv::Reader::from_reader(PRIORITY_LOINC_CSV.as_bytes());
    for record in reader.records().flatten() {
        let (Some(code), Some(display)) = (record.get(0), record.get(1)) else {
            continue;
        };
        if display.contains("Cytomegalovirus") {
            cmv.insert(code.to_owned());
        }
        codes.insert(code.to_owned());
    }
    PriorityList {
        codes: Arc::new(codes),
        cmv,
    }
});

/// The priority LOINC set, parsed once and shared by every [`CibmtrRules`].
pub(super) static PRIORITY_LOINC: LazyLock<Arc<HashSet<String>>> =
    LazyLock::new(|| Arc::clone(&PRIORITY.codes));

/// Whether a LOINC code is a CMV test (priority list display, or the documented extras).
pub(super) fn is_cmv(code: &str) -> bool {
    PRIORITY.cmv.contains(code)
}

/// A LOINC code's shape and mod-10 check digit: `NNNNN-C`.
pub(super) fn is_loinc_code(code: &str) -> bool {
    let Some((num, check)) = code.split_once('-') else {
        return false;
    };
    if num.is_empty()
        || num.len() > 7
        || check.len() != 1
        || !num.bytes().all(|b| b.is_ascii_digit())
        || !check.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    // LOINC's mod 10: from the right, odd positions doubled (digit sums), even positions as is.
    let mut sum = 0u32;
    for (i, b) in num.bytes().rev().enumerate() {
        let d = u32::from(b - b'0');
        sum += if i % 2 == 0 {
            let x = d * 2;
            x / 10 + x % 10
        } else {
            d
        };
    }
    let expected = (10 - sum % 10) % 10;
    u32::from(check.as_bytes()[0] - b'0') == expected
}

pub(super) fn validate(resource: &Value, rules: &CibmtrRules) -> Vec<Issue> {
    let mut ctx = Ctx::new(root_name(resource));
    check_resource(&mut ctx, resource, rules);
    ctx.issues
}

fn check_resource(ctx: &mut Ctx, resource: &Value, rules: &CibmtrRules) {
    let Some(obj) = resource.as_object() else {
        return;
    };
    match obj.get("resourceType").and_then(Value::as_str) {
        Some("Bundle") => check_bundle(ctx, obj, rules),
        Some("Patient") => {
            check_security(ctx, obj, rules);
            check_patient(ctx, obj, rules);
        }
        Some("Observation") => {
            check_security(ctx, obj, rules);
            check_observation(ctx, obj, rules);
        }
        _ => check_security(ctx, obj, rules),
    }
}

fn array<'a, 'b>(obj: &'a Map<'b>, key: &str) -> &'a [Value<'b>] {
    obj.get(key).and_then(Value::as_array).unwrap_or(&[])
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The center's label `{system: <security_system>, code: rc_<ccn>}` in `meta.security`.
fn check_security(ctx: &mut Ctx, obj: &Map, rules: &CibmtrRules) {
    let labels = obj
        .get("meta")
        .and_then(|m| m.get("security"))
        .and_then(Value::as_array)
        .unwrap_or(&[]);
    let mut found = false;
    for (i, label) in labels.iter().enumerate() {
        if str_of(label, "system") != Some(rules.security_system.as_str()) {
            continue;
        }
        found = true;
        let code = str_of(label, "code").unwrap_or("");
        let well_formed = code.len() == 8
            && code.starts_with("rc_")
            && code[3..].bytes().all(|b| b.is_ascii_digit());
        let message = if !well_formed {
            Some(format!(
                "the center label's code must be rc_ and the 5-digit center number (rc_{})",
                rules.ccn
            ))
        } else if code[3..] != *rules.ccn {
            Some(format!(
                "the center label names another center than the configured one (rc_{})",
                rules.ccn
            ))
        } else {
            None
        };
        if let Some(message) = message {
            let m = ctx.enter("meta");
            let m2 = ctx.enter("security");
            let m3 = ctx.enter_index(i);
            ctx.error_at("code", message);
            ctx.leave(m3);
            ctx.leave(m2);
            ctx.leave(m);
        }
    }
    if !found {
        let m = ctx.enter("meta");
        ctx.error_at(
            "security",
            format!(
                "the center's security label is missing ({} | rc_{})",
                rules.security_system, rules.ccn
            ),
        );
        ctx.leave(m);
    }
}

fn check_patient(ctx: &mut Ctx, obj: &Map, rules: &CibmtrRules) {
    let identifiers = array(obj, "identifier");
    let mut crid = false;
    for (i, id) in identifiers.iter().enumerate() {
        let system = str_of(id, "system");
        let m = ctx.enter("identifier");
        let m2 = ctx.enter_index(i);
        if system == Some(rules.crid_system.as_str()) {
            crid = true;
            match str_of(id, "value") {
                None => ctx.error_at("value", "the CRID identifier has no value"),
                Some(v)
                    if v == CRID_PENDING
                        || (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())) => {}
                Some(_) => ctx.error_at("value", "a CRID is a number (digits only)"),
            }
        } else if is_ssn_identifier(id) {
            ctx.error(
                "personal data: a social security number must not be sent in the Patient \
                 (only in the CRID request)",
            );
        }
        ctx.leave(m2);
        ctx.leave(m);
    }
    if !crid {
        ctx.error_at(
            "identifier",
            format!(
                "the CRID identifier (system {}) is missing",
                rules.crid_system
            ),
        );
    }
    if obj.contains_key("name") {
        ctx.error_at(
            "name",
            "personal data: names must not be sent in the Patient (only in the CRID request)",
        );
    }
    for key in ["telecom", "address", "photo", "contact"] {
        if obj.contains_key(key) {
            ctx.at(
                key,
                Severity::Warning,
                "personal data the CIBMTR service does not need; leave it out",
            );
        }
    }
    if !obj.contains_key("text") {
        ctx.at(
            "text",
            Severity::Warning,
            "the IG's minimal Patient carries a narrative (status empty)",
        );
    }
}

/// An SSN by system, by the v2 identifier type `SS`, or by its `###-##-####` shape.
fn is_ssn_identifier(id: &Value) -> bool {
    if str_of(id, "system") == Some(US_SSN) {
        return true;
    }
    let typed_ss = id
        .get("type")
        .and_then(|t| t.get("coding"))
        .and_then(Value::as_array)
        .is_some_and(|codings| {
            codings.iter().any(|c| {
                str_of(c, "system") == Some(V2_IDENTIFIER_TYPE) && str_of(c, "code") == Some("SS")
            })
        });
    typed_ss || str_of(id, "value").is_some_and(looks_like_ssn)
}

fn looks_like_ssn(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 11
        && b.iter().enumerate().all(|(i, &c)| match i {
            3 | 6 => c == b'-',
            _ => c.is_ascii_digit(),
        })
}

fn check_observation(ctx: &mut Ctx, obj: &Map, rules: &CibmtrRules) {
    // The LOINC coding(s) in `code`.
    let codings = obj
        .get("code")
        .and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .unwrap_or(&[]);
    let mut loinc: Option<&str> = None;
    let mut any_loinc = false;
    let m = ctx.enter("code");
    for (i, coding) in codings.iter().enumerate() {
        if str_of(coding, "system") != Some(LOINC) {
            continue;
        }
        any_loinc = true;
        let m1 = ctx.enter("coding");
        let m2 = ctx.enter_index(i);
        match str_of(coding, "code") {
            None => ctx.error_at("code", "the LOINC coding has no code"),
            Some(code) if !is_loinc_code(code) => ctx.error_at(
                "code",
                "not a LOINC code (digits, a hyphen and a valid check digit)",
            ),
            Some(code) => {
                if !rules.priority_loinc.contains(code) {
                    ctx.at(
                        "code",
                        Severity::Warning,
                        "LOINC code outside the IG's priority value set \
                         (cibmtr-priority-variables-2022); allowed, but check the mapping",
                    );
                }
                loinc.get_or_insert(code);
            }
        }
        ctx.leave(m2);
        ctx.leave(m1);
    }
    if !any_loinc {
        ctx.error_at(
            "coding",
            format!("a LOINC coding (system {LOINC}) is required"),
        );
    }
    ctx.leave(m);

    check_subject(ctx, obj);

    match obj.get("effectiveDateTime").and_then(Value::as_str) {
        Some(dt) if super::primitives::has_time_and_zone(dt) => {}
        Some(_) => ctx.error_at(
            "effectiveDateTime",
            "must carry a time of day with a time-zone offset (YYYY-MM-DDThh:mm:ss+hh:mm)",
        ),
        None => ctx.error_at(
            "effectiveDateTime",
            "required: the time of the result, with a time-zone offset",
        ),
    }

    let quantity = obj.get("valueQuantity");
    if let Some(q) = quantity {
        let m = ctx.enter("valueQuantity");
        if q.get("value").is_none() {
            ctx.error_at("value", "a result quantity needs a value");
        }
        if str_of(q, "system") != Some(UCUM) {
            ctx.error_at("system", format!("the unit system must be UCUM ({UCUM})"));
        }
        if q.get("code").is_none() {
            ctx.error_at("code", "the UCUM unit code is required");
        }
        ctx.leave(m);
    } else if let Some(cc) = obj.get("valueCodeableConcept") {
        let coded = cc.get("coding").and_then(Value::as_array).is_some_and(|a| {
            a.iter()
                .any(|c| str_of(c, "system").is_some() && str_of(c, "code").is_some())
        });
        if !coded {
            ctx.error_at(
                "valueCodeableConcept",
                "a coded result needs a coding with a system and a code (SNOMED CT preferred)",
            );
        }
        if loinc.is_some_and(|c| QUANTITY_ONLY.contains(&c)) {
            ctx.error_at(
                "valueCodeableConcept",
                "this vital sign is reported as valueQuantity only",
            );
        }
    } else if obj.contains_key("valueString") {
        ctx.error_at(
            "valueString",
            "valueString is not accepted: use valueQuantity (UCUM) or valueCodeableConcept",
        );
    } else if let Some(k) = obj.keys().find(|k| k.starts_with("value")) {
        ctx.error_at(
            k,
            "the result must be valueQuantity (UCUM) or valueCodeableConcept",
        );
    } else {
        ctx.error_at(
            "value[x]",
            "a result is required: valueQuantity (UCUM) or valueCodeableConcept",
        );
    }

    let laboratory = array(obj, "category").iter().any(|cat| {
        cat.get("coding")
            .and_then(Value::as_array)
            .is_some_and(|a| {
                a.iter().any(|c| {
                    str_of(c, "system") == Some(OBSERVATION_CATEGORY)
                        && str_of(c, "code") == Some("laboratory")
                })
            })
    });
    if !laboratory {
        ctx.at(
            "category",
            Severity::Warning,
            format!("the laboratory category ({OBSERVATION_CATEGORY} | laboratory) is expected"),
        );
    }

    if quantity.is_some() && loinc.is_some_and(is_cmv) && array(obj, "referenceRange").is_empty() {
        ctx.error_at(
            "referenceRange",
            "a CMV result given as a quantity must carry its reference range",
        );
    }
}

/// `subject` must reference the Patient: `Patient/<id>`, an absolute URL to one, or a
/// `urn:uuid:` placeholder resolved inside a transaction.
fn check_subject(ctx: &mut Ctx, obj: &Map) {
    let Some(subject) = obj.get("subject") else {
        ctx.error_at("subject", "required: a reference to the Patient");
        return;
    };
    match str_of(subject, "reference") {
        None => {
            let m = ctx.enter("subject");
            ctx.error_at("reference", "required: a reference to the Patient");
            ctx.leave(m);
        }
        Some(r) => {
            let patient = r.starts_with("urn:uuid:")
                || r.strip_prefix("Patient/").is_some_and(|id| !id.is_empty())
                || r.contains("/Patient/");
            if !patient {
                let m = ctx.enter("subject");
                ctx.error_at(
                    "reference",
                    "must refer to a Patient (Patient/<id> or a urn:uuid placeholder)",
                );
                ctx.leave(m);
            }
        }
    }
}

/// A submission Bundle: a transaction of at most 50 entries, each entry checked as a resource.
fn check_bundle(ctx: &mut Ctx, obj: &Map, rules: &CibmtrRules) {
    if obj.get("type").and_then(Value::as_str) != Some("transaction") {
        ctx.error_at(
            "type",
            "the CIBMTR service processes transaction bundles only",
        );
    }
    let entries = array(obj, "entry");
    if entries.len() > MAX_BUNDLE_ENTRIES {
        ctx.error_at(
            "entry",
            format!("at most {MAX_BUNDLE_ENTRIES} entries per transaction bundle"),
        );
    }
    let full_urls: Vec<&str> = entries
        .iter()
        .filter_map(|e| str_of(e, "fullUrl"))
        .collect();
    let m = ctx.enter("entry");
    for (i, entry) in entries.iter().enumerate() {
        let m2 = ctx.enter_index(i);
        let method = entry.get("request").and_then(|r| str_of(r, "method"));
        match entry.get("resource") {
            Some(resource) => {
                let m3 = ctx.enter("resource");
                check_resource(ctx, resource, rules);
                check_placeholders(ctx, resource, &full_urls);
                ctx.leave(m3);
            }
            None if matches!(method, Some("POST" | "PUT")) => {
                ctx.error_at("resource", "a POST or PUT entry must carry the resource");
            }
            None => {}
        }
        if let Some(method) = method
            && !matches!(method, "POST" | "PUT" | "GET")
        {
            let m3 = ctx.enter("request");
            ctx.error_at(
                "method",
                "the CIBMTR service supports create (POST), update (PUT) and read (GET) only",
            );
            ctx.leave(m3);
        }
        ctx.leave(m2);
    }
    ctx.leave(m);
}

/// Every `urn:uuid:` reference inside a transaction must name another entry's `fullUrl`: the
/// server resolves placeholders only within the bundle.
fn check_placeholders(ctx: &mut Ctx, v: &Value, full_urls: &[&str]) {
    match v {
        Value::Object(obj) => {
            for (k, item) in obj {
                let m = ctx.enter(k);
                match item {
                    Value::String(r) if k == "reference" => {
                        if r.starts_with("urn:uuid:") && !full_urls.contains(&&**r) {
                            ctx.error("no entry of the bundle has this urn:uuid as its fullUrl");
                        }
                    }
                    _ => check_placeholders(ctx, item, full_urls),
                }
                ctx.leave(m);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let m = ctx.enter_index(i);
                check_placeholders(ctx, item, full_urls);
                ctx.leave(m);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::validate::{CibmtrRules, validate as validate_all};
    use serde_json::json;
    use serde_json::{Map, Value};

    fn validate(v: &Value, rules: &CibmtrRules) -> Vec<Issue> {
        super::validate(&crate::resource::json::Node::from_value(v), rules)
    }

    const SEC: &str = "http://cibmtr.org/codesystem/transplant-center";
    const CRID: &str = "http://cibmtr.org/identifier/CRID";

    fn rules() -> CibmtrRules {
        CibmtrRules::new("12001", SEC, CRID)
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "meta": {"security": [{"system": SEC, "code": "rc_12001"}]},
            "text": {"status": "empty", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Patient</div>"},
            "identifier": [{"use": "official", "system": CRID, "value": "3989144"}],
            "gender": "male",
            "birthDate": "1961-07-14"
        })
    }

    /// A realistic CIBMTR lab result: CMV viral load with its reference range.
    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "meta": {"security": [{"system": SEC, "code": "rc_12001"}]},
            "identifier": [{"system": "urn:fhirlift:12001:labs", "value": "LAB-000123-2024-03-01-CMVPCR"}],
            "status": "final",
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}],
            "code": {
                "coding": [
                    {"system": LOINC, "code": "30247-1", "display": "Cytomegalovirus DNA [#/volume] (viral load) in Serum or Plasma by NAA with probe detection"},
                    {"system": "urn:fhirlift:12001:local-lab", "code": "CMVPCR"}
                ],
                "text": "CMV PCR quantitative"
            },
            "subject": {"reference": "Patient/1001"},
            "effectiveDateTime": "2024-03-01T08:30:00-05:00",
            "issued": "2024-03-01T14:02:11-05:00",
            "valueQuantity": {"value": 1250, "comparator": ">=", "unit": "copies/mL", "system": UCUM, "code": "{copies}/mL"},
            "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "H"}]}],
            "referenceRange": [{"high": {"value": 137, "unit": "copies/mL", "system": UCUM, "code": "{copies}/mL"}, "text": "< 137 copies/mL"}]
        })
    }

    fn issues(v: &Value) -> Vec<(Severity, String)> {
        validate(v, &rules())
            .into_iter()
            .map(|i| (i.severity, i.path))
            .collect()
    }

    fn errors(v: &Value) -> Vec<String> {
        validate(v, &rules())
            .into_iter()
            .filter(|i| i.severity == Severity::Error)
            .map(|i| i.path)
            .collect()
    }

    fn with(mut v: Value, f: impl FnOnce(&mut Map<String, Value>)) -> Value {
        f(v.as_object_mut().unwrap());
        v
    }

    #[test]
    fn priority_list_is_loaded() {
        assert_eq!(rules().priority_loinc.len(), 278);
        assert!(is_cmv("30247-1"));
        assert!(is_cmv("5000-5"));
        assert!(!is_cmv("718-7"));
    }

    #[test]
    fn loinc_check_digits() {
        // Every code in the IG's list carries a valid check digit.
        for code in rules().priority_loinc.iter() {
            assert!(is_loinc_code(code), "{code}");
        }
        for extra in EXTRA_CMV_LOINC.iter().chain(QUANTITY_ONLY) {
            assert!(is_loinc_code(extra), "{extra}");
        }
        for bad in [
            "718-8",
            "718",
            "-7",
            "7187",
            "71a-7",
            "12345678-9",
            "718-77",
        ] {
            assert!(!is_loinc_code(bad), "{bad}");
        }
    }

    #[test]
    fn realistic_resources_pass_with_no_issue() {
        assert_eq!(validate_all(&observation(), &rules()), vec![]);
        assert_eq!(validate_all(&patient(), &rules()), vec![]);
    }

    #[test]
    fn security_label() {
        let v = with(patient(), |o| {
            o.remove("meta");
        });
        assert_eq!(errors(&v), ["Patient.meta.security"]);
        let v = with(patient(), |o| {
            o["meta"]["security"][0]["code"] = json!("rc_1200");
        });
        assert_eq!(errors(&v), ["Patient.meta.security[0].code"]);
        let v = with(patient(), |o| {
            o["meta"]["security"] = json!([{"system": "http://other", "code": "x"}, {"system": SEC, "code": "rc_99999"}]);
        });
        let found = validate(&v, &rules());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "Patient.meta.security[1].code");
        assert!(found[0].message.contains("another center"));
        let v = with(patient(), |o| {
            o["meta"]["security"][0]["system"] =
                json!("http://terminology.cibmtr.org/codesystem/transplant-center");
        });
        assert_eq!(errors(&v), ["Patient.meta.security"]);
        // The other URI family, when configured.
        let other = CibmtrRules::new(
            "12001",
            "http://terminology.cibmtr.org/codesystem/transplant-center",
            CRID,
        );
        assert_eq!(validate(&v, &other), vec![]);
    }

    #[test]
    fn patient_crid_and_personal_data() {
        let v = with(patient(), |o| {
            o["identifier"] = json!([{"system": "urn:mrn", "value": "000123"}]);
        });
        assert_eq!(errors(&v), ["Patient.identifier"]);
        let v = with(patient(), |o| {
            o["identifier"][0]["value"] = json!("39-89");
        });
        assert_eq!(errors(&v), ["Patient.identifier[0].value"]);
        let v = with(patient(), |o| {
            o["identifier"][0]["value"] = json!(CRID_PENDING);
        });
        assert_eq!(errors(&v), Vec::<String>::new());
        let v = with(patient(), |o| {
            o.insert("name".into(), json!([{"family": "Doe"}]));
            let ids = o["identifier"].as_array_mut().unwrap();
            ids.push(json!({"system": US_SSN, "value": "x"}));
            ids.push(json!({"type": {"coding": [{"system": V2_IDENTIFIER_TYPE, "code": "SS"}]}, "value": "x"}));
            ids.push(json!({"system": "urn:other", "value": "123-45-6789"}));
        });
        assert_eq!(
            errors(&v),
            [
                "Patient.identifier[1]",
                "Patient.identifier[2]",
                "Patient.identifier[3]",
                "Patient.name"
            ]
        );
        let v = with(patient(), |o| {
            o.insert("telecom".into(), json!([{"system": "phone", "value": "x"}]));
            o.remove("text");
        });
        assert_eq!(
            issues(&v),
            [
                (Severity::Warning, "Patient.telecom".to_owned()),
                (Severity::Warning, "Patient.text".to_owned())
            ]
        );
    }

    #[test]
    fn observation_code() {
        let v = with(observation(), |o| {
            o["code"]["coding"] = json!([{"system": "urn:local", "code": "CMVPCR"}]);
        });
        assert_eq!(errors(&v), ["Observation.code.coding"]);
        let v = with(observation(), |o| {
            o["code"]["coding"][0]["code"] = json!("30247-2");
        });
        assert_eq!(errors(&v), ["Observation.code.coding[0].code"]);
        // Outside the priority set: a warning only (and no CMV rule).
        let v = with(observation(), |o| {
            o["code"]["coding"][0] = json!({"system": LOINC, "code": "2345-7"});
        });
        assert_eq!(
            issues(&v),
            [(
                Severity::Warning,
                "Observation.code.coding[0].code".to_owned()
            )]
        );
    }

    #[test]
    fn observation_subject_and_time() {
        let v = with(observation(), |o| {
            o.remove("subject");
            o["effectiveDateTime"] = json!("2024-03-01");
        });
        assert_eq!(
            errors(&v),
            ["Observation.subject", "Observation.effectiveDateTime"]
        );
        let v = with(observation(), |o| {
            o["subject"] = json!({"reference": "Group/1"});
            o.remove("effectiveDateTime");
            o.insert(
                "effectivePeriod".into(),
                json!({"start": "2024-03-01T08:00:00Z"}),
            );
        });
        assert_eq!(
            errors(&v),
            [
                "Observation.subject.reference",
                "Observation.effectiveDateTime"
            ]
        );
        let v = with(observation(), |o| {
            o["subject"] = json!({"reference": "urn:uuid:6d1c2f0e-8a3b-4c55-9e47-0b1f7a2dc3e9"});
            o["effectiveDateTime"] = json!("2024-03-01T13:30:00Z");
        });
        assert_eq!(errors(&v), Vec::<String>::new());
        let v = with(observation(), |o| {
            o["subject"] = json!({"display": "x"});
        });
        assert_eq!(errors(&v), ["Observation.subject.reference"]);
    }

    #[test]
    fn observation_values() {
        let v = with(observation(), |o| {
            o["valueQuantity"] =
                json!({"value": 3, "unit": "copies/mL", "system": "http://example.org/units"});
        });
        assert_eq!(
            errors(&v),
            [
                "Observation.valueQuantity.system",
                "Observation.valueQuantity.code"
            ]
        );
        let v = with(observation(), |o| {
            o.remove("valueQuantity");
            o.insert("valueString".into(), json!("1250"));
        });
        assert_eq!(errors(&v), ["Observation.valueString"]);
        let v = with(observation(), |o| {
            o.remove("valueQuantity");
        });
        assert_eq!(errors(&v), ["Observation.value[x]"]);
        let v = with(observation(), |o| {
            o.remove("valueQuantity");
            o.insert("valueBoolean".into(), json!(true));
        });
        assert_eq!(errors(&v), ["Observation.valueBoolean"]);
        let v = with(observation(), |o| {
            o.remove("valueQuantity");
            o.insert(
                "valueCodeableConcept".into(),
                json!({"coding": [{"system": "http://snomed.info/sct", "code": "260385009"}]}),
            );
        });
        assert_eq!(issues(&v), vec![]);
        let v = with(observation(), |o| {
            o.remove("valueQuantity");
            o.insert("valueCodeableConcept".into(), json!({"text": "negative"}));
        });
        assert_eq!(errors(&v), ["Observation.valueCodeableConcept"]);
        let v = with(observation(), |o| {
            o["code"]["coding"] = json!([{"system": LOINC, "code": "29463-7"}]);
            o.remove("valueQuantity");
            o.insert(
                "valueCodeableConcept".into(),
                json!({"coding": [{"system": "urn:x", "code": "y"}]}),
            );
        });
        assert_eq!(errors(&v), ["Observation.valueCodeableConcept"]);
    }

    #[test]
    fn observation_category_and_cmv_range() {
        let v = with(observation(), |o| {
            o.remove("category");
            o.remove("referenceRange");
        });
        assert_eq!(
            issues(&v),
            [
                (Severity::Warning, "Observation.category".to_owned()),
                (Severity::Error, "Observation.referenceRange".to_owned())
            ]
        );
        // A non-CMV quantity without a range is fine.
        let v = with(observation(), |o| {
            o["code"]["coding"][0] = json!({"system": LOINC, "code": "718-7"});
            o.remove("referenceRange");
        });
        assert_eq!(issues(&v), vec![]);
    }

    #[test]
    fn bundles_check_each_entry() {
        let entry = |fu: &str, r: Value| json!({"fullUrl": fu, "resource": r, "request": {"method": "POST", "url": r["resourceType"]}});
        let mut obs = observation();
        obs["subject"]["reference"] = json!("urn:uuid:6d1c2f0e-8a3b-4c55-9e47-0b1f7a2dc3e9");
        let good = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            entry("urn:uuid:6d1c2f0e-8a3b-4c55-9e47-0b1f7a2dc3e9", patient()),
            entry("urn:uuid:6d1c2f0e-8a3b-4c55-9e47-0b1f7a2dc3ea", obs),
        ]});
        assert_eq!(validate_all(&good, &rules()), vec![]);
        let mut bad = good.clone();
        bad["type"] = json!("batch");
        bad["entry"][1]["resource"]["meta"]["security"][0]["code"] = json!("rc_12002");
        bad["entry"][0]["request"]["method"] = json!("DELETE");
        assert_eq!(
            errors(&bad),
            [
                "Bundle.type",
                "Bundle.entry[0].request.method",
                "Bundle.entry[1].resource.meta.security[0].code"
            ]
        );
        // Placeholders resolve inside the bundle only.
        let mut dangling = good.clone();
        dangling["entry"][1]["resource"]["subject"]["reference"] =
            json!("urn:uuid:6d1c2f0e-8a3b-4c55-9e47-0b1f7a2dc3ff");
        assert_eq!(
            errors(&dangling),
            ["Bundle.entry[1].resource.subject.reference"]
        );
        let mut big = good;
        let (p, o) = (big["entry"][0].clone(), big["entry"][1].clone());
        big["entry"] = Value::Array(std::iter::once(p).chain(vec![o; 50]).collect());
        assert_eq!(errors(&big), ["Bundle.entry"]);
    }

    #[test]
    fn messages_never_carry_values() {
        let v = with(patient(), |o| {
            o["identifier"][0]["value"] = json!("SECRET");
            o["meta"]["security"][0]["code"] = json!("SECRET");
            o.insert("name".into(), json!([{"family": "SECRET"}]));
        });
        for i in validate_all(&v, &rules()) {
            assert!(!i.message.contains("SECRET"), "{i}");
        }
    }
}
