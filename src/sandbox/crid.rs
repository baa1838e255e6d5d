//! `PUT /CRID`: request validation and matching.
//!
//! Perfect matches follow the contract: SSN + birth date + gender, or birth date + first name +
//! last name + gender. Names are compared case- and accent-insensitively (NFKD, combining marks
//! dropped, letters and digits only). Only salted hashes of those keys are stored. Error messages
//! name the field, never its value.

use serde_json::{Map, Value, json};
use unicode_normalization::UnicodeNormalization;

use super::store::{Store, StoreError};
// The contract's code lists and formats, shared with the mapping stage's check of the same body.
use crate::validate::crid::{
    ETHNICITY_CODES, NUMBER_FIELDS, RACE_CODES, STRING_FIELDS, is_date, is_ssn,
};

/// A rejected request: answered 400 with `{"errorMessage": …}`.
#[derive(Debug, PartialEq, Eq)]
pub struct CridRequestError(pub String);

/// A validated request: the CCN and the matching keys it yields (not yet hashed).
#[derive(Debug)]
pub struct CridRequest {
    pub ccn: String,
    ssn_key: Option<String>,
    name_key: String,
}

fn err(msg: impl Into<String>) -> CridRequestError {
    CridRequestError(msg.into())
}

/// Lowercase letters and digits of `s` with accents removed: `Ünal-Ó'Brien` → `unalobrien`.
pub fn normalize_name(s: &str) -> String {
    s.nfkd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric())
        .collect()
}

impl CridRequest {
    /// Validates a `PUT /CRID` body.
    pub fn parse(body: &[u8]) -> Result<CridRequest, CridRequestError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|_| err("request body is not valid JSON"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err("request body must be a JSON object"))?;
        for k in obj.keys() {
            if k != "ccn" && k != "patient" {
                return Err(err(format!("unknown field `{k}`")));
            }
        }
        let ccn = match obj.get("ccn") {
            None => return Err(err("`ccn` is required")),
            Some(Value::String(s)) if s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.clone()
            }
            Some(Value::String(_)) => return Err(err("`ccn` must be five digits")),
            Some(_) => return Err(err("`ccn` must be a string of five digits")),
        };
        let p: &Map<String, Value> = match obj.get("patient") {
            None => return Err(err("`patient` is required")),
            Some(Value::Object(p)) => p,
            Some(_) => return Err(err("`patient` must be an object")),
        };
        for (k, val) in p {
            if STRING_FIELDS.contains(&k.as_str()) {
                if !val.is_string() {
                    return Err(err(format!("`patient.{k}` must be a string")));
                }
            } else if NUMBER_FIELDS.contains(&k.as_str()) {
                let ok = val.as_u64().is_some();
                if !ok {
                    return Err(err(format!(
                        "`patient.{k}` must be a non-negative whole number"
                    )));
                }
            } else if k == "race" {
                let arr = val
                    .as_array()
                    .ok_or_else(|| err("`patient.race` must be an array of codes"))?;
                for (i, r) in arr.iter().enumerate() {
                    if !r.as_str().is_some_and(|c| RACE_CODES.contains(&c)) {
                        return Err(err(format!(
                            "`patient.race[{i}]` is not one of {}",
                            RACE_CODES.join(", ")
                        )));
                    }
                }
            } else {
                return Err(err(format!("unknown field `patient.{k}`")));
            }
        }
        let text = |k: &str| p.get(k).and_then(Value::as_str);
        let required = |k: &str| -> Result<&str, CridRequestError> {
            match text(k) {
                Some(s) if !s.trim().is_empty() => Ok(s),
                _ => Err(err(format!("`patient.{k}` is required"))),
            }
        };
        let first = normalize_name(required("firstName")?);
        let last = normalize_name(required("lastName")?);
        if first.is_empty() {
            return Err(err("`patient.firstName` has no letters"));
        }
        if last.is_empty() {
            return Err(err("`patient.lastName` has no letters"));
        }
        let birth = required("birthDate")?;
        if !is_date(birth) {
            return Err(err("`patient.birthDate` must be a date YYYY-MM-DD"));
        }
        let gender = required("gender")?;
        if gender != "M" && gender != "F" {
            return Err(err("`patient.gender` must be M or F"));
        }
        let ssn = match text("ssn") {
            None => None,
            Some(s) if is_ssn(s) => Some(s.replace('-', "")),
            Some(_) => return Err(err("`patient.ssn` must look like ###-##-####")),
        };
        if let Some(e) = text("ethnicity")
            && !ETHNICITY_CODES.contains(&e)
        {
            return Err(err(format!(
                "`patient.ethnicity` is not one of {}",
                ETHNICITY_CODES.join(", ")
            )));
        }
        Ok(CridRequest {
            ccn,
            ssn_key: ssn.map(|s| format!("ssn\x1f{s}\x1f{birth}\x1f{gender}")),
            name_key: format!("name\x1f{birth}\x1f{first}\x1f{last}\x1f{gender}"),
        })
    }
}

/// Finds the perfect matches of `req`, or assigns a new CRID, and returns the response body.
/// The caller runs this inside one store transaction.
pub fn lookup_or_assign(
    store: &mut Store,
    req: &CridRequest,
    now: &str,
) -> Result<Value, StoreError> {
    let name_key = store.hash_key(&req.name_key);
    let ssn_key = req.ssn_key.as_ref().map(|k| store.hash_key(k));
    let by_ssn = match &ssn_key {
        Some(k) => store.crid_for_key(k)?,
        None => None,
    };
    let by_name = store.crid_for_key(&name_key)?;
    let mut matches = Vec::new();
    if let Some(c) = by_ssn {
        matches.push(json!({
            "matchedCriteria": ["SSN", "Gender", "DateOfBirth"],
            "matchType": "Perfect1",
            "crid": c,
        }));
    }
    if let Some(c) = by_name
        && by_ssn != Some(c)
    {
        matches.push(json!({
            "matchedCriteria": ["FirstName", "LastName", "Gender", "DateOfBirth"],
            "matchType": "Perfect1",
            "crid": c,
        }));
    }
    match (by_ssn, by_name) {
        (None, None) => {
            let crid = store.new_crid(&req.ccn, now)?;
            store.add_crid_key(&name_key, crid)?;
            if let Some(k) = &ssn_key {
                store.add_crid_key(k, crid)?;
            }
            Ok(json!({ "crid": crid }))
        }
        // One person found by one rule: remember the other key too, so the same demographics
        // keep finding this CRID.
        (Some(c), None) => {
            store.add_crid_key(&name_key, c)?;
            Ok(json!({ "perfectMatch": matches }))
        }
        (None, Some(c)) => {
            if let Some(k) = &ssn_key {
                store.add_crid_key(k, c)?;
            }
            Ok(json!({ "perfectMatch": matches }))
        }
        // Both rules matched; if they name different CRIDs the answer lists both and a person
        // has to resolve it.
        (Some(_), Some(_)) => Ok(json!({ "perfectMatch": matches })),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn body(p: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"ccn": "12001", "patient": p})).unwrap()
    }

    #[test]
    fn names_are_case_and_accent_insensitive() {
        assert_eq!(
            normalize_name("Ünal Ó'Brien"),
            normalize_name("unal obrien")
        );
        assert_eq!(normalize_name("JOSÉ"), "jose");
    }

    #[test]
    fn validation_names_the_field_not_the_value() {
        let e = CridRequest::parse(&body(json!({
            "firstName": "Ann", "lastName": "Lee", "birthDate": "1980-02-30", "gender": "M"
        })))
        .unwrap_err();
        assert!(e.0.contains("birthDate"), "{}", e.0);
        assert!(!e.0.contains("1980"));
        let e = CridRequest::parse(&body(json!({
            "firstName": "Ann", "lastName": "Lee", "birthDate": "1980-02-03", "gender": "M",
            "ssn": "123456789"
        })))
        .unwrap_err();
        assert!(e.0.contains("ssn") && !e.0.contains("123456789"));
    }

    #[test]
    fn same_demographics_same_crid() {
        let mut s = Store::open(None).unwrap();
        let a = CridRequest::parse(&body(json!({
            "firstName": "José", "lastName": "Núñez", "birthDate": "1980-02-03", "gender": "M"
        })))
        .unwrap();
        let first = lookup_or_assign(&mut s, &a, "now").unwrap();
        let crid = first["crid"].as_i64().unwrap();
        let b = CridRequest::parse(&body(json!({
            "firstName": "jose", "lastName": "NUNEZ", "birthDate": "1980-02-03", "gender": "M",
            "ssn": "123-45-6789"
        })))
        .unwrap();
        let again = lookup_or_assign(&mut s, &b, "now").unwrap();
        assert_eq!(again["perfectMatch"][0]["crid"].as_i64(), Some(crid));
        // Now the SSN alone (with other names) finds the same person.
        let c = CridRequest::parse(&body(json!({
            "firstName": "J", "lastName": "N", "birthDate": "1980-02-03", "gender": "M",
            "ssn": "123-45-6789"
        })))
        .unwrap();
        let by_ssn = lookup_or_assign(&mut s, &c, "now").unwrap();
        assert_eq!(by_ssn["perfectMatch"][0]["crid"].as_i64(), Some(crid));
        assert_eq!(by_ssn["perfectMatch"][0]["matchedCriteria"][0], "SSN");
    }
}
