//! The custom template filters and functions: FHIR dates, genders, US Core race and ethnicity,
//! UCUM quantities, lookups, deterministic identifiers and `required`.
//!
//! Each filter is a plain function so it can be tested without a template. A filter that fails
//! because of the data returns a minijinja error whose source is [`UnmappedCode`] or
//! [`RequiredMissing`], so the engine can turn it into a precise row error and count it. Filters
//! must not touch files, the environment or the clock, and their messages must not quote patient
//! values (codes are fine).

use std::borrow::Cow;
use std::cell::RefCell;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone};
use minijinja::value::{Object, ObjectRepr, Value};
use minijinja::{Error, ErrorKind, State};
use rust_decimal::Decimal;

use super::lookup::Lookups;

/// The code system of UCUM units.
pub const UCUM: &str = "http://unitsofmeasure.org";
/// CDC Race & Ethnicity code system (US Core's OMB categories).
pub const CDC_RACE_ETHNICITY: &str = "urn:oid:2.16.840.1.113883.6.238";
pub const US_CORE_RACE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race";
pub const US_CORE_ETHNICITY: &str =
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity";

/// A decimal in a template. It prints with the scale it was read with (`12.50` stays `12.50`),
/// and the engine's JSON formatter writes it as a bare JSON number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecimalValue(pub Decimal);

impl Object for DecimalValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn is_true(self: &Arc<Self>) -> bool {
        !self.0.is_zero()
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result
    where
        Self: Sized + 'static,
    {
        write!(f, "{}", self.0)
    }
}

/// A lookup that found no entry. The engine reports it as a row error and counts it in the
/// report's unmapped-codes section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no entry for code {code:?} in lookup table {table}")]
pub struct UnmappedCode {
    pub table: String,
    pub code: String,
}

/// `required` found an empty value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{column}: a required value is empty")]
pub struct RequiredMissing {
    pub column: String,
}

/// `quantity(…, expected=…)` found a result in another unit than its code is measured in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unit {unit:?} is not {expected:?}, the unit the lookup table gives for this code")]
pub struct UnitMismatch {
    pub unit: String,
    pub expected: String,
}

fn invalid(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message)
}

fn is_empty(v: &Value) -> bool {
    v.is_none() || v.is_undefined() || v.as_str().is_some_and(|s| s.trim().is_empty())
}

/// The value as text, for values that are codes or dates: borrowed when it is a string.
fn text_of(v: &Value) -> Cow<'_, str> {
    match v.as_str() {
        Some(s) => Cow::Borrowed(s.trim()),
        None => Cow::Owned(v.to_string()),
    }
}

/// `value | date` — a FHIR `date` (`YYYY-MM-DD`) from a date, a date-time (its date part, in its
/// own offset) or ISO text. `none` stays `none` (the member is then left out).
pub fn date(value: Value) -> Result<Value, Error> {
    if is_empty(&value) {
        return Ok(Value::from(()));
    }
    let text = text_of(&value);
    let parsed = parse_date_or_datetime(&text)
        .ok_or_else(|| invalid("value is not a date (expected YYYY-MM-DD or an ISO date-time)"))?;
    let date = match parsed {
        Temporal::Date(d) => d,
        Temporal::Naive(dt) => dt.date(),
        Temporal::Offset(dt) => dt.date_naive(),
    };
    Ok(Value::from(date.format("%Y-%m-%d").to_string()))
}

/// `value | dateTime` or `value | dateTime("America/Chicago")` — a FHIR `dateTime` that always
/// carries an offset when it has a time. A naive date-time is read in the given zone, else the
/// source's configured zone (the context variable `timezone`); an instant that does not exist in
/// that zone (a spring-forward gap) is an error, an ambiguous one (fall-back) takes the earlier
/// offset. A date without a time stays a date (FHIR allows it; no time is invented).
pub fn date_time(state: &State, value: Value, zone: Option<&str>) -> Result<Value, Error> {
    if is_empty(&value) {
        return Ok(Value::from(()));
    }
    let text = text_of(&value);
    let parsed = parse_date_or_datetime(&text).ok_or_else(|| {
        invalid("value is not a date-time (expected an ISO date-time such as 2024-03-01T08:30:00)")
    })?;
    let out = match parsed {
        Temporal::Date(d) => d.format("%Y-%m-%d").to_string(),
        Temporal::Offset(dt) => format_offset(&dt),
        Temporal::Naive(naive) => {
            let context_zone;
            let zone_name = match zone {
                Some(z) => z,
                None => {
                    context_zone = state.lookup("timezone");
                    context_zone
                        .as_ref()
                        .and_then(|v| v.as_str())
                        .unwrap_or("UTC")
                }
            };
            let tz = time_zone(zone_name)
                .ok_or_else(|| invalid(format!("unknown time zone {zone_name:?}")))?;
            let local = tz.from_local_datetime(&naive).earliest().ok_or_else(|| {
                invalid(format!(
                    "the local time does not exist in {zone_name} (daylight-saving gap)"
                ))
            })?;
            format_offset(&local.fixed_offset())
        }
    };
    Ok(Value::from(out))
}

/// The zone of an IANA name. The last name seen on this thread is kept, since a run reads one
/// or two zones for millions of rows.
fn time_zone(name: &str) -> Option<chrono_tz::Tz> {
    thread_local! {
        static LAST: RefCell<Option<(String, chrono_tz::Tz)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((n, tz)) if n == name => Some(*tz),
        _ => {
            let tz = chrono_tz::Tz::from_str(name).ok()?;
            *last = Some((name.to_string(), tz));
            Some(tz)
        }
    })
}

/// RFC 3339 with the offset (`+HH:MM`, `Z` never used); fractions of a second only when there
/// are any. Whole seconds, the common case, are written without chrono's formatter.
fn format_offset(dt: &DateTime<chrono::FixedOffset>) -> String {
    use chrono::{Datelike, Timelike};
    if dt.nanosecond() != 0 || !(0..=9999).contains(&dt.year()) {
        return dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false);
    }
    let offset = dt.offset().local_minus_utc();
    let mut out = String::with_capacity(25);
    crate::source::row::push_iso_seconds(&mut out, &dt.naive_local());
    out.push(if offset < 0 { '-' } else { '+' });
    let offset = offset.unsigned_abs();
    crate::source::row::push_two_digits(&mut out, offset / 3600);
    out.push(':');
    crate::source::row::push_two_digits(&mut out, offset / 60 % 60);
    out
}

enum Temporal {
    Date(NaiveDate),
    Naive(NaiveDateTime),
    Offset(DateTime<chrono::FixedOffset>),
}

/// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SS` or `YYYY-MM-DD HH:MM:SS`, read without chrono's format
/// parser (the layouts the readers write); `None` sends anything else to the full parser.
fn parse_common(s: &str) -> Option<Temporal> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(part.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    if b.len() != 10 && b.len() != 19 {
        return None;
    }
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    if b.len() == 10 {
        return Some(Temporal::Date(date));
    }
    if !matches!(b[10], b'T' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let dt = date.and_hms_opt(num(11..13)?, num(14..16)?, num(17..19)?)?;
    Some(Temporal::Naive(dt))
}

fn parse_date_or_datetime(s: &str) -> Option<Temporal> {
    if let Some(t) = parse_common(s) {
        return Some(t);
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Some(Temporal::Date(d));
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(Temporal::Offset(dt));
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(Temporal::Naive(dt));
        }
    }
    None
}

/// Looks `key` up in `table`; no entry is an [`UnmappedCode`] error. `none` stays `none`.
pub fn lookup_in(lookups: &Lookups, table: &str, key: &Value) -> Result<Value, Error> {
    if is_empty(key) {
        return Ok(Value::from(()));
    }
    let t = lookups.get(table).ok_or_else(|| {
        invalid(format!(
            "unknown lookup table {table:?}; declare it in the mapping's [lookups]"
        ))
    })?;
    let code = text_of(key);
    match t.get(&code) {
        Some(entry) => Ok(entry.clone()),
        None => {
            let e = UnmappedCode {
                table: table.to_string(),
                code: code.into_owned(),
            };
            Err(invalid(e.to_string()).with_source(e))
        }
    }
}

/// A field of a looked-up entry, `none` when the cell is empty.
fn field(entry: &Value, name: &str) -> Result<Value, Error> {
    let v = entry.get_attr(name)?;
    if v.is_undefined() {
        return Err(invalid(format!("the lookup table has no column {name:?}")));
    }
    Ok(v)
}

/// `row.sex | fhir_gender` (table `sex` by default, column `fhir_gender`) — the FHIR
/// `Patient.gender` code (`male`, `female`, `other`, `unknown`) for a local code.
pub fn fhir_gender(lookups: &Lookups, value: Value, table: Option<String>) -> Result<Value, Error> {
    let entry = lookup_in(lookups, table.as_deref().unwrap_or("sex"), &value)?;
    if entry.is_none() {
        return Ok(entry);
    }
    let g = field(&entry, "fhir_gender")?;
    match g.as_str() {
        Some("male" | "female" | "other" | "unknown") | None => Ok(g),
        Some(other) => Err(invalid(format!(
            "lookup column fhir_gender holds {other:?}, not one of male, female, other, unknown"
        ))),
    }
}

/// `row.sex | crid_gender` (table `sex`, column `crid_gender`) — the CRID service's `M` or `F`;
/// `none` when the table leaves it empty (the CRID body then has no gender).
pub fn crid_gender(lookups: &Lookups, value: Value, table: Option<String>) -> Result<Value, Error> {
    let entry = lookup_in(lookups, table.as_deref().unwrap_or("sex"), &value)?;
    if entry.is_none() {
        return Ok(entry);
    }
    let g = field(&entry, "crid_gender")?;
    match g.as_str() {
        Some("M" | "F") | None => Ok(g),
        Some(other) => Err(invalid(format!(
            "lookup column crid_gender holds {other:?}, not M or F"
        ))),
    }
}

/// Codes as a list: a sequence stays one, a single value becomes a one-item list.
fn codes(value: &Value) -> Result<Vec<Value>, Error> {
    if is_empty(value) {
        return Ok(Vec::new());
    }
    if value.as_str().is_none() && value.try_iter().is_ok() && value.len().is_some() {
        return Ok(value.try_iter()?.filter(|v| !is_empty(v)).collect());
    }
    Ok(vec![value.clone()])
}

/// Builds a US Core race or ethnicity extension from looked-up entries (columns `omb_code`,
/// `omb_display`, optional `omb_system`).
fn us_core_extension(url: &str, entries: &[Value]) -> Result<Value, Error> {
    if entries.is_empty() {
        return Ok(Value::from(()));
    }
    let mut parts = Vec::new();
    let mut texts = Vec::new();
    for entry in entries {
        let code = field(entry, "omb_code")?;
        let display = field(entry, "omb_display")?;
        let system = entry
            .get_attr("omb_system")
            .ok()
            .filter(|v| !v.is_none() && !v.is_undefined())
            .unwrap_or_else(|| Value::from(CDC_RACE_ETHNICITY));
        if let Some(d) = display.as_str() {
            texts.push(d.to_string());
        }
        parts.push(Value::from_iter([
            ("url", Value::from("ombCategory")),
            (
                "valueCoding",
                Value::from_iter([("system", system), ("code", code), ("display", display)]),
            ),
        ]));
    }
    parts.push(Value::from_iter([
        ("url", Value::from("text")),
        ("valueString", Value::from(texts.join(", "))),
    ]));
    Ok(Value::from_iter([
        ("url", Value::from(url)),
        ("extension", Value::from(parts)),
    ]))
}

fn entries(lookups: &Lookups, table: &str, value: &Value) -> Result<Vec<Value>, Error> {
    codes(value)?
        .iter()
        .map(|c| lookup_in(lookups, table, c))
        .collect()
}

/// `row.race | us_core_race` (table `race`) — the US Core race extension object, one
/// `ombCategory` per code (a list of codes is accepted) plus the required `text`.
pub fn us_core_race(
    lookups: &Lookups,
    value: Value,
    table: Option<String>,
) -> Result<Value, Error> {
    let e = entries(lookups, table.as_deref().unwrap_or("race"), &value)?;
    us_core_extension(US_CORE_RACE, &e)
}

/// `row.ethnicity | us_core_ethnicity` (table `ethnicity`) — the US Core ethnicity extension.
pub fn us_core_ethnicity(
    lookups: &Lookups,
    value: Value,
    table: Option<String>,
) -> Result<Value, Error> {
    let e = entries(lookups, table.as_deref().unwrap_or("ethnicity"), &value)?;
    us_core_extension(US_CORE_ETHNICITY, &e)
}

/// `row.race | crid_race` — the CRID body's `race` list (column `crid` of table `race`).
pub fn crid_race(lookups: &Lookups, value: Value, table: Option<String>) -> Result<Value, Error> {
    let e = entries(lookups, table.as_deref().unwrap_or("race"), &value)?;
    if e.is_empty() {
        return Ok(Value::from(()));
    }
    let codes: Result<Vec<Value>, Error> = e.iter().map(|x| field(x, "crid")).collect();
    Ok(Value::from(codes?))
}

/// `row.ethnicity | crid_ethnicity` — the CRID body's `ethnicity` code (column `crid`).
pub fn crid_ethnicity(
    lookups: &Lookups,
    value: Value,
    table: Option<String>,
) -> Result<Value, Error> {
    let entry = lookup_in(lookups, table.as_deref().unwrap_or("ethnicity"), &value)?;
    if entry.is_none() {
        return Ok(entry);
    }
    field(&entry, "crid")
}

/// The value as a decimal, keeping the written scale; `None` for empty values.
pub fn to_decimal(value: &Value) -> Result<Option<Decimal>, Error> {
    if is_empty(value) {
        return Ok(None);
    }
    if let Some(d) = value.downcast_object_ref::<DecimalValue>() {
        return Ok(Some(d.0));
    }
    if let Some(s) = value.as_str() {
        return Decimal::from_str(s.trim())
            .or_else(|_| Decimal::from_scientific(s.trim()))
            .map(Some)
            .map_err(|_| {
                invalid(
                    "text that is not a number (a column that holds only numbers can be \
                     declared `decimal`, with `decimal_comma = true` for 12,5)",
                )
            });
    }
    if let Some(i) = value.as_i64() {
        return Ok(Some(Decimal::from(i)));
    }
    if value.is_number() {
        // A float: its shortest round-trip text, so 0.1 stays 0.1.
        return Decimal::from_str(&value.to_string())
            .or_else(|_| Decimal::from_scientific(&value.to_string()))
            .map(Some)
            .map_err(|_| invalid("value is not a finite number"));
    }
    Err(invalid("value is not a number"))
}

/// `value | decimal` — a number from text or a number, keeping its scale (`"7.50"` → `7.50`).
pub fn decimal(value: Value) -> Result<Value, Error> {
    Ok(match to_decimal(&value)? {
        Some(d) => Value::from_object(DecimalValue(d)),
        None => Value::from(()),
    })
}

/// `value | quantity("mg/dL", comparator=row.comparator, unit="mg/dL", expected=lab.ucum)` — a
/// FHIR Quantity in UCUM: `{"value", "comparator"?, "unit", "system": UCUM, "code"}`. The
/// comparator must be one of `<`, `<=`, `>=`, `>` or empty. With `expected` (the unit the code is
/// measured in), another UCUM code fails the row with [`UnitMismatch`]: a LOINC code names what
/// is measured in which kind of unit, so a result in other units needs its own code. `none`
/// stays `none`.
pub fn quantity(
    value: Value,
    code: &str,
    kwargs: minijinja::value::Kwargs,
) -> Result<Value, Error> {
    static UCUM_VALUE: LazyLock<Value> = LazyLock::new(|| Value::from(UCUM));
    // `peek` and a check of the names, rather than `get` and `assert_all_used`, which keep a
    // set of the names used for every call.
    if let Some(other) = kwargs
        .args()
        .find(|a| !matches!(*a, "comparator" | "unit" | "expected"))
    {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            format!("unknown keyword argument '{other}'"),
        ));
    }
    let comparator: Option<Value> = kwargs.peek("comparator")?;
    let unit: Option<&str> = kwargs.peek("unit")?;
    let Some(number) = to_decimal(&value)? else {
        return Ok(Value::from(()));
    };
    if code.trim().is_empty() || code.contains(char::is_whitespace) {
        return Err(invalid(format!("{code:?} is not a UCUM code")));
    }
    let expected: Option<&str> = kwargs.peek("expected")?;
    if let Some(expected) = expected.filter(|e| !e.trim().is_empty() && *e != code) {
        let e = UnitMismatch {
            unit: code.to_string(),
            expected: expected.to_string(),
        };
        return Err(invalid(e.to_string()).with_source(e));
    }
    let mut members: Vec<(&'static str, Value)> = Vec::with_capacity(5);
    members.push(("value", Value::from_object(DecimalValue(number))));
    if let Some(c) = comparator.filter(|c| !is_empty(c)) {
        let c = text_of(&c);
        if !matches!(&*c, "<" | "<=" | ">=" | ">") {
            return Err(invalid(format!(
                "comparator {c:?} is not one of <, <=, >=, >"
            )));
        }
        members.push(("comparator", Value::from(&*c)));
    }
    members.push(("unit", Value::from(unit.unwrap_or(code))));
    members.push(("system", UCUM_VALUE.clone()));
    members.push(("code", Value::from(code)));
    Ok(super::json::JsonMap::value(members))
}

/// `row.result | split_comparator` — a result written with its comparator in one cell (`<35`,
/// `>= 1000`) as `{"comparator": "<", "value": "35"}`, for `quantity`'s `comparator`. Text
/// without one gives `comparator` none and the text; a number gives `comparator` none and the
/// number; `none` stays `none`.
pub fn split_comparator(value: Value) -> Result<Value, Error> {
    if is_empty(&value) {
        return Ok(Value::from(()));
    }
    let Some(text) = value.as_str() else {
        return Ok(super::json::JsonMap::value([
            ("comparator", Value::from(())),
            ("value", value),
        ]));
    };
    let text = text.trim();
    let (comparator, rest) = ["<=", ">=", "<", ">"]
        .iter()
        .find_map(|c| {
            text.strip_prefix(c)
                .map(|rest| (Value::from(*c), rest.trim_start()))
        })
        .unwrap_or((Value::from(()), text));
    Ok(super::json::JsonMap::value([
        ("comparator", comparator),
        ("value", Value::from(rest)),
    ]))
}

/// `row.ssn | ssn` — a US Social Security number as the CRID service takes it, `###-##-####`,
/// from text with or without dashes or spaces, or from a number (a workbook cell that dropped
/// the leading zeros gets them back). Anything that is not nine digits fails the row, without
/// repeating the value. `none` stays `none`.
pub fn ssn(value: Value) -> Result<Value, Error> {
    if is_empty(&value) {
        return Ok(Value::from(()));
    }
    let digits: String = match value.as_i64() {
        Some(n) if (1..1_000_000_000).contains(&n) => format!("{n:09}"),
        Some(_) => String::new(),
        None => text_of(&value)
            .chars()
            .filter(|c| !matches!(c, '-' | ' '))
            .collect(),
    };
    if digits.len() != 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            "ssn: not a US Social Security number (nine digits)",
        ));
    }
    Ok(Value::from(format!(
        "{}-{}-{}",
        &digits[..3],
        &digits[3..5],
        &digits[5..]
    )))
}

/// `key | uuid5("Observation")` — a deterministic UUID (v5, in fhirlift's namespace) of a kind
/// and a key: the same key always gives the same id, different kinds never collide.
pub fn uuid5(key: Value, kind: Option<&str>) -> Result<Value, Error> {
    if is_empty(&key) {
        return Err(invalid("uuid5 needs a non-empty key"));
    }
    let name = format!("{}:{}", kind.unwrap_or_default(), text_of(&key));
    Ok(Value::from(
        uuid::Uuid::new_v5(&crate::resource::FHIRLIFT_NAMESPACE, name.as_bytes()).to_string(),
    ))
}

/// `row.birth_date | required("birth_date")` — the value itself, or a [`RequiredMissing`] row
/// error naming the column when it is empty.
pub fn required(value: Value, column: Option<&str>) -> Result<Value, Error> {
    if is_empty(&value) {
        let e = RequiredMissing {
            column: column.unwrap_or("(unnamed)").to_string(),
        };
        return Err(invalid(e.to_string()).with_source(e));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::Environment;

    fn lookups() -> (tempfile::TempDir, Lookups) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut l = Lookups::default();
        let sex = dir.path().join("sex.csv");
        std::fs::write(
            &sex,
            "code,fhir_gender,crid_gender\nM,male,M\nF,female,F\nU,unknown,\n",
        )
        .expect("w");
        let race = dir.path().join("race.csv");
        std::fs::write(
            &race,
            "code,omb_code,omb_display,omb_system,crid\nW,2106-3,White,,2106-3\nD,ASKU,Asked but no answer,http://terminology.hl7.org/CodeSystem/v3-NullFlavor,ASKU\n",
        )
        .expect("w");
        let eth = dir.path().join("eth.csv");
        std::fs::write(
            &eth,
            "code,omb_code,omb_display,crid\nH,2135-2,Hispanic or Latino,2135-2\n",
        )
        .expect("w");
        l.add("sex", &sex).expect("sex");
        l.add("race", &race).expect("race");
        l.add("ethnicity", &eth).expect("eth");
        (dir, l)
    }

    fn render(tmpl: &str, ctx: Value) -> Result<String, Error> {
        let mut env = Environment::new();
        env.add_filter("dateTime", date_time);
        env.render_str(tmpl, ctx)
    }

    #[test]
    fn date_takes_the_date_part_and_keeps_none() {
        assert_eq!(
            date(Value::from("2024-02-29")).expect("d").as_str(),
            Some("2024-02-29")
        );
        assert_eq!(
            date(Value::from("2024-03-01T08:30:00"))
                .expect("dt")
                .as_str(),
            Some("2024-03-01")
        );
        assert!(date(Value::from(())).expect("none").is_none());
        let e = date(Value::from("02/30/1975")).expect_err("not a date");
        assert!(
            !e.to_string().contains("1975"),
            "no value in the message: {e}"
        );
    }

    #[test]
    fn date_time_applies_the_zone_and_always_has_an_offset() {
        let ctx = minijinja::context! { timezone => "America/Chicago", v => "2024-03-01T08:30:00" };
        assert_eq!(
            render("{{ v | dateTime }}", ctx).expect("r"),
            "2024-03-01T08:30:00-06:00"
        );
        // Summer time.
        let ctx = minijinja::context! { timezone => "America/Chicago", v => "2024-07-01 08:30:00" };
        assert_eq!(
            render("{{ v | dateTime }}", ctx).expect("r"),
            "2024-07-01T08:30:00-05:00"
        );
        // An explicit zone wins; an offset in the value is kept.
        let ctx = minijinja::context! { v => "2024-03-01T08:30:00" };
        assert_eq!(
            render("{{ v | dateTime('Europe/Paris') }}", ctx).expect("r"),
            "2024-03-01T08:30:00+01:00"
        );
        let ctx =
            minijinja::context! { timezone => "America/Chicago", v => "2024-03-01T08:30:00+02:00" };
        assert_eq!(
            render("{{ v | dateTime }}", ctx).expect("r"),
            "2024-03-01T08:30:00+02:00"
        );
        // No zone configured: UTC.
        let ctx = minijinja::context! { v => "2024-03-01T08:30:00" };
        assert_eq!(
            render("{{ v | dateTime }}", ctx).expect("r"),
            "2024-03-01T08:30:00+00:00"
        );
        // A spring-forward gap does not exist.
        let ctx = minijinja::context! { timezone => "America/Chicago", v => "2024-03-10T02:30:00" };
        assert!(render("{{ v | dateTime }}", ctx).is_err());
    }

    #[test]
    fn the_quick_date_reader_agrees_with_the_full_one() {
        let show = |t: Option<Temporal>| match t {
            Some(Temporal::Date(d)) => format!("date {d}"),
            Some(Temporal::Naive(dt)) => format!("naive {dt}"),
            Some(Temporal::Offset(dt)) => format!("offset {dt}"),
            None => "none".to_string(),
        };
        for s in [
            "2024-03-01",
            "2024-02-29",
            "2023-02-29",
            "2024-03-01T08:30:00",
            "2024-03-01 23:59:59",
            "2024-03-01T24:00:00",
            "2024-13-01",
            "2024-3-1",
            "0000-01-01",
            "9999-12-31T23:59:59",
            "2024-03-01T08:30",
            "2024-03-01x08:30:00",
            "2024-0a-01",
        ] {
            let full = show(parse_date_or_datetime(s));
            if let Some(quick) = parse_common(s) {
                assert_eq!(show(Some(quick)), full, "{s}");
            }
        }
        assert!(parse_common("2024-03-01T08:30:00").is_some());
        assert!(parse_common("2024-03-01").is_some());
    }

    #[test]
    fn genders_come_from_the_sex_table() {
        let (_d, l) = lookups();
        assert_eq!(
            fhir_gender(&l, Value::from("F"), None).expect("f").as_str(),
            Some("female")
        );
        assert_eq!(
            crid_gender(&l, Value::from("M"), None).expect("m").as_str(),
            Some("M")
        );
        assert!(
            crid_gender(&l, Value::from("U"), None)
                .expect("u")
                .is_none()
        );
        let e = fhir_gender(&l, Value::from("X"), None).expect_err("unmapped");
        let src = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<UnmappedCode>())
            .expect("unmapped source");
        assert_eq!(src.code, "X");
        assert_eq!(src.table, "sex");
    }

    #[test]
    fn race_and_ethnicity_become_us_core_extensions_and_crid_codes() {
        let (_d, l) = lookups();
        let ext = us_core_race(&l, Value::from("W"), None).expect("race");
        let json = serde_json::to_string(&ext).expect("json");
        assert_eq!(
            json,
            r#"{"url":"http://hl7.org/fhir/us/core/StructureDefinition/us-core-race","extension":[{"url":"ombCategory","valueCoding":{"system":"urn:oid:2.16.840.1.113883.6.238","code":"2106-3","display":"White"}},{"url":"text","valueString":"White"}]}"#
        );
        let declined = us_core_race(&l, Value::from("D"), None).expect("declined");
        assert!(
            serde_json::to_string(&declined)
                .expect("j")
                .contains("v3-NullFlavor")
        );
        let e = us_core_ethnicity(&l, Value::from("H"), None).expect("eth");
        assert!(
            serde_json::to_string(&e)
                .expect("j")
                .contains("us-core-ethnicity")
        );
        let crid = crid_race(&l, Value::from(vec!["W", "D"]), None).expect("crid race");
        assert_eq!(
            serde_json::to_string(&crid).expect("j"),
            r#"["2106-3","ASKU"]"#
        );
        assert_eq!(
            crid_ethnicity(&l, Value::from("H"), None)
                .expect("e")
                .as_str(),
            Some("2135-2")
        );
        assert!(
            us_core_race(&l, Value::from(()), None)
                .expect("none")
                .is_none()
        );
    }

    #[test]
    fn quantity_keeps_scale_and_checks_the_comparator() {
        let v = Value::from_object(DecimalValue(Decimal::from_str("12.50").expect("d")));
        let kw = minijinja::value::Kwargs::from_iter([("comparator", Value::from("<"))]);
        let q = quantity(v, "g/dL", kw).expect("quantity");
        assert_eq!(q.get_attr("value").expect("v").to_string(), "12.50");
        assert_eq!(q.get_attr("comparator").expect("c").as_str(), Some("<"));
        assert_eq!(q.get_attr("system").expect("s").as_str(), Some(UCUM));
        assert_eq!(q.get_attr("code").expect("c").as_str(), Some("g/dL"));
        let kw = minijinja::value::Kwargs::from_iter([("comparator", Value::from("~"))]);
        assert!(quantity(Value::from("1"), "g/dL", kw).is_err());
        let kw = minijinja::value::Kwargs::from_iter(Vec::<(&str, Value)>::new());
        assert!(quantity(Value::from("pending"), "g/dL", kw).is_err());
        // A misspelt keyword is an error, not silently ignored.
        let kw = minijinja::value::Kwargs::from_iter([("comparater", Value::from("<"))]);
        let e = quantity(Value::from("1"), "g/dL", kw).expect_err("unknown keyword");
        assert_eq!(e.kind(), ErrorKind::TooManyArguments);
        let kw = minijinja::value::Kwargs::from_iter([("unit", Value::from("grams/dL"))]);
        let q = quantity(Value::from("1"), "g/dL", kw).expect("unit");
        assert_eq!(q.get_attr("unit").expect("u").as_str(), Some("grams/dL"));
    }

    #[test]
    fn split_comparator_takes_the_comparator_off_the_front() {
        let parts = |v: Value| {
            let r = split_comparator(v).expect("split");
            (
                r.get_attr("comparator")
                    .expect("c")
                    .as_str()
                    .map(str::to_string),
                r.get_attr("value").expect("v").to_string(),
            )
        };
        assert_eq!(parts(Value::from("<35")), (Some("<".into()), "35".into()));
        assert_eq!(
            parts(Value::from(" >= 1000 ")),
            (Some(">=".into()), "1000".into())
        );
        assert_eq!(
            parts(Value::from("<=0.5")),
            (Some("<=".into()), "0.5".into())
        );
        assert_eq!(parts(Value::from("12.5")), (None, "12.5".into()));
        assert_eq!(parts(Value::from("Detected")), (None, "Detected".into()));
        assert_eq!(parts(Value::from(7)), (None, "7".into()));
        assert!(split_comparator(Value::from(())).expect("none").is_none());
        assert!(
            split_comparator(Value::from("  "))
                .expect("blank")
                .is_none()
        );
        // In a template, feeding `quantity`.
        let mut env = Environment::new();
        env.add_filter("split_comparator", split_comparator);
        env.add_filter("quantity", quantity);
        let out = env
            .render_str(
                "{% set r = v | split_comparator %}{{ r.value | quantity('[IU]/mL', comparator=r.comparator) }}",
                minijinja::context! { v => "<35" },
            )
            .expect("render");
        assert!(out.contains("35") && out.contains('<'), "{out}");
    }

    #[test]
    fn ssn_is_written_as_the_crid_service_takes_it() {
        let ok = |v: Value| ssn(v).expect("ssn").as_str().map(str::to_string);
        assert_eq!(
            ok(Value::from("123-45-6789")).as_deref(),
            Some("123-45-6789")
        );
        assert_eq!(ok(Value::from("123456789")).as_deref(), Some("123-45-6789"));
        assert_eq!(
            ok(Value::from(" 123 45 6789 ")).as_deref(),
            Some("123-45-6789")
        );
        // A number cell that lost its leading zero.
        assert_eq!(ok(Value::from(12345678)).as_deref(), Some("012-34-5678"));
        assert!(ssn(Value::from(())).expect("none").is_none());
        for bad in [
            Value::from("12-345"),
            Value::from("12345678X"),
            Value::from(-5),
        ] {
            let e = ssn(bad).expect_err("not an SSN");
            assert!(!e.to_string().contains("12345"), "{e}");
        }
    }

    #[test]
    fn quantity_refuses_a_unit_other_than_the_one_its_code_is_measured_in() {
        let kw = minijinja::value::Kwargs::from_iter([("expected", Value::from("mg/dL"))]);
        let e = quantity(Value::from("167"), "umol/L", kw).expect_err("mismatch");
        let source = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<UnitMismatch>())
            .expect("a UnitMismatch");
        assert_eq!(source.unit, "umol/L");
        assert_eq!(source.expected, "mg/dL");
        let kw = minijinja::value::Kwargs::from_iter([("expected", Value::from("mg/dL"))]);
        assert!(quantity(Value::from("1.2"), "mg/dL", kw).is_ok());
        // A code measured in no unit (an empty `ucum` in the table) sets no expectation.
        let kw = minijinja::value::Kwargs::from_iter([("expected", Value::from(""))]);
        assert!(quantity(Value::from("1.2"), "mg/dL", kw).is_ok());
    }

    #[test]
    fn offsets_are_written_as_rfc_3339_whatever_the_path() {
        let zone = chrono::FixedOffset::west_opt(5 * 3600 + 30 * 60).expect("offset");
        let whole = zone
            .with_ymd_and_hms(2024, 3, 1, 8, 5, 9)
            .single()
            .expect("instant");
        assert_eq!(format_offset(&whole), "2024-03-01T08:05:09-05:30");
        assert_eq!(
            format_offset(&whole),
            whole.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
        );
        let fraction = whole + chrono::Duration::milliseconds(250);
        assert_eq!(format_offset(&fraction), "2024-03-01T08:05:09.250-05:30");
        let utc = chrono::FixedOffset::east_opt(0)
            .and_then(|z| z.with_ymd_and_hms(812, 12, 31, 23, 59, 59).single())
            .expect("utc");
        assert_eq!(format_offset(&utc), "0812-12-31T23:59:59+00:00");
    }

    #[test]
    fn decimals_parse_text_and_keep_scale() {
        assert_eq!(decimal(Value::from("7.50")).expect("d").to_string(), "7.50");
        assert_eq!(decimal(Value::from(3)).expect("i").to_string(), "3");
        assert_eq!(decimal(Value::from(0.1)).expect("f").to_string(), "0.1");
        assert!(decimal(Value::from(())).expect("none").is_none());
        assert!(decimal(Value::from("abc")).is_err());
    }

    #[test]
    fn uuid5_is_deterministic_per_kind_and_key() {
        let a = uuid5(Value::from("A1"), Some("Observation")).expect("a");
        let b = uuid5(Value::from("A1"), Some("Observation")).expect("b");
        let c = uuid5(Value::from("A1"), Some("Patient")).expect("c");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.as_str().map(str::len), Some(36));
        assert!(uuid5(Value::from(""), None).is_err());
    }

    #[test]
    fn required_names_the_column() {
        assert_eq!(
            required(Value::from("x"), None).expect("x").as_str(),
            Some("x")
        );
        let e = required(Value::from(" "), Some("birth_date")).expect_err("empty");
        let src = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<RequiredMissing>())
            .expect("required source");
        assert_eq!(src.column, "birth_date");
    }

    #[test]
    fn lookup_returns_the_entry_or_an_unmapped_code() {
        let (_d, l) = lookups();
        let e = lookup_in(&l, "sex", &Value::from("M")).expect("M");
        assert_eq!(e.get_attr("fhir_gender").expect("g").as_str(), Some("male"));
        assert!(lookup_in(&l, "sex", &Value::from("Z")).is_err());
        assert!(lookup_in(&l, "nope", &Value::from("M")).is_err());
        assert!(
            lookup_in(&l, "sex", &Value::from(()))
                .expect("none")
                .is_none()
        );
    }
}
