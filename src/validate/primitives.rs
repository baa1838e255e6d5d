//! FHIR R4 primitive datatypes: the JSON shape and the lexical format of each (the regular
//! expressions of the R4 datatypes page, written out as byte scanners so that nothing is compiled
//! at run time and a check costs nanoseconds).
//!
//! Checks here look at one value only; they never name the value in a message (values may be
//! patient data), only what was expected.

use crate::resource::json::Node as Value;

/// R4: "strings SHALL NOT exceed 1MB in size".
const MAX_STRING_BYTES: usize = 1024 * 1024;

/// The R4 primitive types fhirlift checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Primitive {
    Boolean,
    Integer,
    PositiveInt,
    UnsignedInt,
    Decimal,
    String,
    Markdown,
    Code,
    Id,
    Uri,
    Url,
    Canonical,
    Oid,
    Uuid,
    Base64Binary,
    Date,
    DateTime,
    Instant,
    Time,
    Xhtml,
}

impl Primitive {
    /// Checks one JSON value; on failure, says what was expected.
    pub fn check(self, v: &Value) -> Result<(), &'static str> {
        match self {
            Primitive::Boolean => match v {
                Value::Bool(_) => Ok(()),
                _ => Err("must be a JSON boolean (true or false)"),
            },
            Primitive::Decimal => match v {
                // A JSON number literal is already a valid FHIR decimal.
                Value::Number(_) => Ok(()),
                _ => Err("must be a JSON number (decimal)"),
            },
            Primitive::Integer | Primitive::PositiveInt | Primitive::UnsignedInt => {
                let Value::Number(n) = v else {
                    return Err("must be a JSON number without fraction or exponent");
                };
                let Some(i) = n.parse::<i64>().ok() else {
                    return Err("must be a whole number within the 32-bit range");
                };
                if i32::try_from(i).is_err() {
                    return Err("must be a whole number within the 32-bit range");
                }
                match self {
                    Primitive::PositiveInt if i < 1 => {
                        Err("must be a positive integer (1 or more)")
                    }
                    Primitive::UnsignedInt if i < 0 => {
                        Err("must be an unsigned integer (0 or more)")
                    }
                    _ => Ok(()),
                }
            }
            _ => {
                let Value::String(s) = v else {
                    return Err("must be a JSON string");
                };
                self.check_str(s)
            }
        }
    }

    /// Checks the lexical form of a string-valued primitive.
    pub fn check_str(self, s: &str) -> Result<(), &'static str> {
        if s.is_empty() {
            return Err("must not be an empty string");
        }
        if s.len() > MAX_STRING_BYTES {
            return Err("longer than the 1 MB R4 allows for a string");
        }
        let ok = match self {
            Primitive::String | Primitive::Markdown => is_string(s),
            Primitive::Code => is_code(s),
            Primitive::Id => is_id(s),
            Primitive::Uri | Primitive::Url | Primitive::Canonical => is_uri(s),
            Primitive::Oid => is_oid(s),
            Primitive::Uuid => is_uuid(s),
            Primitive::Base64Binary => is_base64(s),
            Primitive::Date => is_date(s),
            Primitive::DateTime => is_date_time(s),
            Primitive::Instant => is_instant(s),
            Primitive::Time => is_time(s),
            Primitive::Xhtml => is_xhtml_div(s),
            _ => false,
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            Primitive::String | Primitive::Markdown => {
                "must not contain control characters other than tab, CR and LF"
            }
            Primitive::Code => "not a valid code (no leading, trailing or repeated whitespace)",
            Primitive::Id => "not a valid id (1 to 64 of A-Z a-z 0-9 - .)",
            Primitive::Uri | Primitive::Url | Primitive::Canonical => {
                "not a valid uri (must not contain whitespace)"
            }
            Primitive::Oid => "not a valid oid (urn:oid:1.2.3...)",
            Primitive::Uuid => "not a valid uuid (urn:uuid: and lower-case hex 8-4-4-4-12)",
            Primitive::Base64Binary => "not valid base64",
            Primitive::Date => "not a valid date (YYYY, YYYY-MM or YYYY-MM-DD)",
            Primitive::DateTime => {
                "not a valid dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss with a \
                 time zone)"
            }
            Primitive::Instant => "not a valid instant (YYYY-MM-DDThh:mm:ss[.f] with a time zone)",
            Primitive::Time => "not a valid time (hh:mm:ss[.f])",
            Primitive::Xhtml => {
                "not a valid narrative: must be a non-empty <div xmlns=\"http://www.w3.org/1999/xhtml\"> \
                 element without scripts"
            }
            _ => "invalid value",
        })
    }
}

/// R4 `string`: `[ \r\n\t\S]+`, i.e. no control characters except tab, CR and LF.
pub fn is_string(s: &str) -> bool {
    // One pass over the bytes: bytes of multi-byte UTF-8 characters are all >= 0x80.
    !s.is_empty()
        && s.bytes()
            .all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t' || b == b'\r' || b == b'\n')
}

/// R4 `code`: `[^\s]+(\s[^\s]+)*`.
pub fn is_code(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || is_ws(b[0]) || is_ws(b[b.len() - 1]) {
        return false;
    }
    // No two whitespace characters in a row; the only whitespace allowed is a single separator.
    let mut prev_ws = false;
    for &c in b {
        let ws = is_ws(c);
        if ws && prev_ws {
            return false;
        }
        if c < 0x20 && !ws {
            return false;
        }
        prev_ws = ws;
    }
    true
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// R4 `id`: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// R4 `uri` (and `url`, `canonical`): `\S*`, non-empty in JSON.
pub fn is_uri(s: &str) -> bool {
    // `\S` in the R4 regexes is ASCII whitespace, as in the Java and XML Schema regex dialects.
    !s.is_empty() && !s.bytes().any(is_ws)
}

/// R4 `oid`: `urn:oid:[0-2](\.(0|[1-9][0-9]*))+`.
pub fn is_oid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:oid:") else {
        return false;
    };
    let mut arcs = rest.split('.');
    match arcs.next() {
        Some("0" | "1" | "2") => {}
        _ => return false,
    }
    let mut n = 0;
    for arc in arcs {
        n += 1;
        let ok = arc == "0"
            || (!arc.is_empty()
                && !arc.starts_with('0')
                && arc.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return false;
        }
    }
    n > 0
}

/// R4 `uuid`: `urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`.
pub fn is_uuid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:uuid:") else {
        return false;
    };
    let b = rest.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// R4 `base64Binary`: `(\s*([0-9a-zA-Z\+/=]){4}\s*)+`.
pub fn is_base64(s: &str) -> bool {
    let mut n = 0usize;
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=' {
            n += 1;
        } else if !is_ws(b) {
            return false;
        }
    }
    n > 0 && n.is_multiple_of(4)
}

/// R4 `date`: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`, and the day must exist in that month.
pub fn is_date(s: &str) -> bool {
    matches!(parse_date(s.as_bytes()), Some(n) if n == s.len())
}

/// R4 `dateTime`: a partial date, or a full date with a time that carries a time zone.
pub fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    let Some(n) = parse_date(b) else {
        return false;
    };
    if n == b.len() {
        return true;
    }
    // A time is only allowed after a full date.
    n == 10 && b[n] == b'T' && time_with_zone(&b[n + 1..])
}

/// R4 `instant`: a full date and time with seconds and a time zone.
pub fn is_instant(s: &str) -> bool {
    let b = s.as_bytes();
    matches!(parse_date(b), Some(10)) && b.len() > 11 && b[10] == b'T' && time_with_zone(&b[11..])
}

/// R4 `time`: `hh:mm:ss(.f+)?`, no time zone.
pub fn is_time(s: &str) -> bool {
    matches!(parse_time(s.as_bytes()), Some(n) if n == s.len())
}

/// Whether a dateTime string carries a time of day and therefore (in valid R4) a time zone.
pub fn has_time_and_zone(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() > 11 && b[10] == b'T' && is_date_time(s)
}

/// A narrative `div`: the XHTML root element, non-empty, no scripts or document-level elements
/// (R4 txt-1 and txt-2, checked lexically rather than by a full XHTML parser).
pub fn is_xhtml_div(s: &str) -> bool {
    let t = s.trim();
    if !t.starts_with("<div") || !t.ends_with("</div>") {
        return false;
    }
    let Some(open_end) = t.find('>') else {
        return false;
    };
    let open = &t[..open_end];
    if !open.contains("xmlns=\"http://www.w3.org/1999/xhtml\"")
        && !open.contains("xmlns='http://www.w3.org/1999/xhtml'")
    {
        return false;
    }
    // txt-2: some non-whitespace content between the tags (text or child elements).
    let inner_end = t.len() - "</div>".len();
    if open_end + 1 > inner_end || t[open_end + 1..inner_end].trim().is_empty() {
        return false;
    }
    let lower = t.to_ascii_lowercase();
    const FORBIDDEN: [&str; 8] = [
        "<script",
        "<head",
        "<body",
        "<html",
        "<form",
        "<iframe",
        "<object",
        "javascript:",
    ];
    !FORBIDDEN.iter().any(|f| lower.contains(f))
}

fn digits(b: &[u8], from: usize, n: usize) -> Option<u32> {
    let slice = b.get(from..from + n)?;
    let mut v = 0u32;
    for &c in slice {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Some(v)
}

/// Parses the date part; returns how many bytes it used (4, 7 or 10).
fn parse_date(b: &[u8]) -> Option<usize> {
    let year = digits(b, 0, 4)?;
    // The R4 regex excludes year 0000.
    if year == 0 {
        return None;
    }
    if b.len() == 4 || b[4] != b'-' {
        return Some(4);
    }
    let month = digits(b, 5, 2)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    if b.len() == 7 || b[7] != b'-' {
        return Some(7);
    }
    let day = digits(b, 8, 2)?;
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    Some(10)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

/// Parses `hh:mm:ss(.f+)?`; returns the bytes used.
fn parse_time(b: &[u8]) -> Option<usize> {
    let h = digits(b, 0, 2)?;
    let m = digits(b, 3, 2)?;
    let s = digits(b, 6, 2)?;
    if b[2] != b':' || b[5] != b':' || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let mut n = 8;
    if b.get(8) == Some(&b'.') {
        let frac = b[9..].iter().take_while(|c| c.is_ascii_digit()).count();
        if frac == 0 {
            return None;
        }
        n = 9 + frac;
    }
    Some(n)
}

/// `hh:mm:ss(.f+)?(Z|(+|-)hh:mm)` with the offset limited to -14:00..+14:00 as in the R4 regex.
fn time_with_zone(b: &[u8]) -> bool {
    let Some(n) = parse_time(b) else {
        return false;
    };
    let z = &b[n..];
    if z == b"Z" {
        return true;
    }
    if z.len() != 6 || !(z[0] == b'+' || z[0] == b'-') || z[3] != b':' {
        return false;
    }
    match (digits(z, 1, 2), digits(z, 4, 2)) {
        (Some(h), Some(m)) => (h <= 13 && m <= 59) || (h == 14 && m == 0),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::resource::json::Node;
    use serde_json::Value;

    /// A tree of a `json!` literal, for `Primitive::check`.
    macro_rules! node {
        ($($t:tt)*) => {
            Node::from_value(&json!($($t)*))
        };
    }
    use serde_json::json;

    #[test]
    fn dates() {
        for ok in [
            "2024",
            "2024-02",
            "2024-02-29",
            "2000-02-29",
            "0001-01-01",
            "1999-12-31",
        ] {
            assert!(is_date(ok), "{ok}");
        }
        for bad in [
            "",
            "0000",
            "24",
            "2024-2",
            "2024-13",
            "2023-02-29",
            "1900-02-29",
            "2024-04-31",
            "2024-01-00",
            "2024-01-01T10:00:00Z",
            "2024/01/01",
            "2024-01-01 ",
            "２０２４",
        ] {
            assert!(!is_date(bad), "{bad}");
        }
    }

    #[test]
    fn date_times() {
        for ok in [
            "2024",
            "2024-05",
            "2024-05-06",
            "2024-05-06T10:11:12Z",
            "2024-05-06T10:11:12.345+02:00",
            "2024-05-06T23:59:60-14:00",
            "2024-05-06T00:00:00+14:00",
        ] {
            assert!(is_date_time(ok), "{ok}");
        }
        for bad in [
            "2024-05-06T10:11:12",
            "2024-05-06T10:11Z",
            "2024-05T10:11:12Z",
            "2024-05-06T24:00:00Z",
            "2024-05-06T10:11:12+15:00",
            "2024-05-06T10:11:12+14:30",
            "2024-05-06T10:11:12.Z",
            "2024-05-06T10:11:12+0200",
            "2024-05-06 10:11:12Z",
            "2024-05-06T",
        ] {
            assert!(!is_date_time(bad), "{bad}");
        }
        assert!(has_time_and_zone("2024-05-06T10:11:12Z"));
        assert!(!has_time_and_zone("2024-05-06"));
    }

    #[test]
    fn instants_and_times() {
        assert!(is_instant("2024-05-06T10:11:12.5Z"));
        assert!(!is_instant("2024-05-06"));
        assert!(!is_instant("2024-05-06T10:11:12"));
        assert!(is_time("10:11:12"));
        assert!(is_time("10:11:12.123"));
        assert!(!is_time("10:11"));
        assert!(!is_time("10:11:12Z"));
        assert!(!is_time("25:00:00"));
    }

    #[test]
    fn ids_codes_uris() {
        assert!(is_id("abc-1.2"));
        assert!(is_id(&"a".repeat(64)));
        assert!(!is_id(&"a".repeat(65)));
        assert!(!is_id("a b"));
        assert!(!is_id("a_b"));
        assert!(!is_id(""));
        assert!(is_code("final"));
        assert!(is_code("two words"));
        for bad in [" final", "final ", "two  words", "a\u{1}b", ""] {
            assert!(!is_code(bad), "{bad:?}");
        }
        assert!(is_uri("http://loinc.org"));
        assert!(is_uri("urn:uuid:x"));
        assert!(!is_uri("http://a b"));
        assert!(!is_uri(""));
        assert!(is_oid("urn:oid:2.16.840.1.113883.6.238"));
        assert!(!is_oid("urn:oid:3.1"));
        assert!(!is_oid("urn:oid:2.01"));
        assert!(!is_oid("urn:oid:2"));
        assert!(is_uuid("urn:uuid:6d1c2f0e-8a3b-4c55-9e47-0b1f7a2dc3e9"));
        assert!(!is_uuid("urn:uuid:6D1C2F0E-8A3B-4C55-9E47-0B1F7A2DC3E9"));
        assert!(!is_uuid("6d1c2f0e-8a3b-4c55-9e47-0b1f7a2dc3e9"));
        assert!(is_base64("aGVsbG8="));
        assert!(!is_base64("aGVsbG8"));
        assert!(!is_base64("a$b="));
    }

    #[test]
    fn strings() {
        assert!(is_string("Line one\nline two\ttabbed"));
        assert!(is_string("Müller"));
        assert!(!is_string(""));
        assert!(!is_string("bell\u{7}"));
        assert!(!is_string("del\u{7f}"));
    }

    #[test]
    fn xhtml() {
        assert!(is_xhtml_div(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\">Patient</div>"
        ));
        assert!(is_xhtml_div(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>x</p></div>"
        ));
        assert!(!is_xhtml_div("<div>Patient</div>"));
        assert!(!is_xhtml_div(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\">  </div>"
        ));
        assert!(!is_xhtml_div("Patient"));
        assert!(!is_xhtml_div(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\"><script>x</script></div>"
        ));
    }

    #[test]
    fn json_shapes() {
        assert!(Primitive::Boolean.check(&node!(true)).is_ok());
        assert!(Primitive::Boolean.check(&node!("true")).is_err());
        assert!(Primitive::Decimal.check(&node!(1.50)).is_ok());
        assert!(Primitive::Decimal.check(&node!("1.5")).is_err());
        assert!(Primitive::Integer.check(&node!(-3)).is_ok());
        assert!(Primitive::Integer.check(&node!(1.5)).is_err());
        assert!(Primitive::Integer.check(&node!(3_000_000_000i64)).is_err());
        assert!(Primitive::PositiveInt.check(&node!(0)).is_err());
        assert!(Primitive::PositiveInt.check(&node!(1)).is_ok());
        assert!(Primitive::UnsignedInt.check(&node!(0)).is_ok());
        assert!(Primitive::UnsignedInt.check(&node!(-1)).is_err());
        assert!(Primitive::Date.check(&node!(20240101)).is_err());
        assert!(Primitive::String.check(&node!("")).is_err());
        assert!(
            Primitive::String
                .check(&node!("x".repeat(MAX_STRING_BYTES)))
                .is_ok()
        );
        assert!(
            Primitive::Markdown
                .check(&node!("x".repeat(MAX_STRING_BYTES + 1)))
                .is_err()
        );
        // Literal precision is kept (serde_json's arbitrary_precision) and still a decimal.
        let v: Value = serde_json::from_str("1.000000000000000000001").unwrap();
        assert!(Primitive::Decimal.check(&Node::from_value(&v)).is_ok());
        let v: Value = serde_json::from_str("2.0").unwrap();
        assert!(Primitive::Integer.check(&Node::from_value(&v)).is_err());
    }
}
