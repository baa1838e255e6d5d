//! The `patient` object of a `PUT /CRID` request, checked before it leaves the mapping stage, so
//! that a dry run already shows the patients the CRID service would refuse (a sex with no `M`/`F`
//! code, a birth date in the wrong shape). The rules are the contract's: required `firstName`,
//! `lastName`, `birthDate` (`YYYY-MM-DD`) and `gender` (`M` or `F`); `ssn` as `###-##-####`;
//! race and ethnicity from the CRID code lists; `nmdpRid` and `cibmtrTeam` numbers, every other
//! member a string. Messages name the member, never its value.

use serde_json::{Map, Value};

use super::{Issue, Severity};

/// Path prefix of every issue: the member of the request body.
const ROOT: &str = "CRID.patient";

const REQUIRED: &[&str] = &["firstName", "lastName", "birthDate", "gender"];
/// Members the contract types as strings.
pub(crate) const STRING_FIELDS: &[&str] = &[
    "firstName",
    "lastName",
    "birthDate",
    "gender",
    "ssn",
    "mothersMaidenName",
    "ethnicity",
    "ebmtCic",
    "ebmtId",
    "cibmtrIubmid",
];
/// Members the contract types as JSON numbers.
pub(crate) const NUMBER_FIELDS: &[&str] = &["nmdpRid", "cibmtrTeam"];
/// CRID race codes.
pub(crate) const RACE_CODES: &[&str] = &[
    "1002-5", "2028-9", "2054-5", "2076-8", "2106-3", "ASKU", "UNK",
];
/// CRID ethnicity codes.
pub(crate) const ETHNICITY_CODES: &[&str] = &["2135-2", "2186-5", "UNK"];

fn error(issues: &mut Vec<Issue>, member: &str, message: &str) {
    issues.push(Issue {
        severity: Severity::Error,
        path: format!("{ROOT}.{member}"),
        message: message.to_owned(),
    });
}

/// `YYYY-MM-DD`, a real date.
pub(crate) fn is_date(s: &str) -> bool {
    s.len() == 10 && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

/// `###-##-####`.
pub(crate) fn is_ssn(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 11
        && b.iter().enumerate().all(|(i, c)| match i {
            3 | 6 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// Every problem with a rendered CRID `patient` object.
pub fn validate_crid_patient(patient: &Map<String, Value>) -> Vec<Issue> {
    let mut issues = Vec::new();
    for member in REQUIRED {
        let missing = match patient.get(*member) {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.trim().is_empty(),
            _ => false,
        };
        if missing {
            let message = if *member == "gender" {
                "is required, M or F: the row's sex has no CRID gender code"
            } else {
                "is required"
            };
            error(&mut issues, member, message);
        }
    }
    for (member, value) in patient {
        let name = member.as_str();
        if STRING_FIELDS.contains(&name) {
            let Some(text) = value.as_str() else {
                error(&mut issues, name, "must be a string");
                continue;
            };
            match name {
                "birthDate" if !is_date(text) => {
                    error(&mut issues, name, "must be a date as YYYY-MM-DD")
                }
                "gender" if text != "M" && text != "F" => error(
                    &mut issues,
                    name,
                    "must be M or F (the CRID service takes no other code)",
                ),
                "ssn" if !is_ssn(text) => error(&mut issues, name, "must be written ###-##-####"),
                "ethnicity" if !ETHNICITY_CODES.contains(&text) => error(
                    &mut issues,
                    name,
                    "is not a CRID ethnicity code (2135-2, 2186-5, UNK)",
                ),
                _ => {}
            }
        } else if NUMBER_FIELDS.contains(&name) {
            if !value.is_number() {
                error(&mut issues, name, "must be a number");
            }
        } else if name == "race" {
            match value.as_array() {
                Some(codes) if !codes.is_empty() => {
                    let known = codes
                        .iter()
                        .all(|c| c.as_str().is_some_and(|c| RACE_CODES.contains(&c)));
                    if !known {
                        error(
                            &mut issues,
                            name,
                            "holds a code that is not a CRID race code (1002-5, 2028-9, 2054-5, 2076-8, 2106-3, ASKU, UNK)",
                        );
                    }
                }
                _ => error(&mut issues, name, "must be a non-empty list of race codes"),
            }
        } else {
            error(
                &mut issues,
                name,
                "is not a member of the CRID request (see the API contract)",
            );
        }
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value) -> Vec<String> {
        let Value::Object(map) = v else {
            panic!("test input must be an object")
        };
        validate_crid_patient(&map)
            .into_iter()
            .map(|i| i.path)
            .collect()
    }

    #[test]
    fn a_complete_request_passes() {
        let ok = json!({"firstName": "Ana", "lastName": "Lee", "birthDate": "1970-01-02",
            "gender": "F", "ssn": "123-45-6789", "race": ["2106-3"], "ethnicity": "2186-5",
            "nmdpRid": 5});
        assert!(check(ok).is_empty());
    }

    #[test]
    fn missing_gender_and_bad_shapes_name_the_member_not_the_value() {
        let bad = json!({"firstName": "Ana", "lastName": "", "birthDate": "02/01/1970",
            "ssn": "123456789", "race": ["W"], "ethnicity": "N", "nickname": "x"});
        let paths = check(bad.clone());
        for p in [
            "CRID.patient.lastName",
            "CRID.patient.gender",
            "CRID.patient.birthDate",
            "CRID.patient.ssn",
            "CRID.patient.race",
            "CRID.patient.ethnicity",
            "CRID.patient.nickname",
        ] {
            assert!(paths.iter().any(|x| x == p), "{p} in {paths:?}");
        }
        let Value::Object(map) = bad else { return };
        for issue in validate_crid_patient(&map) {
            assert!(!issue.message.contains("02/01/1970"), "{issue}");
            assert!(!issue.message.contains("123456789"), "{issue}");
        }
    }

    #[test]
    fn gender_u_is_refused() {
        let u = json!({"firstName": "A", "lastName": "B", "birthDate": "1970-01-02",
            "gender": "U"});
        assert_eq!(check(u), ["CRID.patient.gender"]);
    }
}
