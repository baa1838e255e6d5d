//! JSON output of templates: the formatter that writes `{{ … }}` values into `*.json.j2`
//! templates (the rendered documents are parsed and cleaned up by [`crate::resource::json`]).
//!
//! minijinja's own JSON escaping goes through serde, which would turn a decimal into a string;
//! this formatter writes [`DecimalValue`]s as bare JSON numbers with their scale, and everything
//! else as proper JSON (strings escaped, so a quote or backslash in a value cannot break the
//! document). It must not be used for anything but template output.

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value, ValueKind};
use minijinja::{AutoEscape, Error, ErrorKind, Output, State};

use super::filters::DecimalValue;
use crate::resource::json::write_escaped as escape_str;

/// A small JSON object for templates (a lookup entry, a Quantity, the business identifier): its
/// members in order, readable as `x.member`, and written by [`formatter`] straight from the list
/// instead of through minijinja's generic map iteration.
#[derive(Debug, Clone, Default)]
pub struct JsonMap(pub Vec<(Cow<'static, str>, Value)>);

impl JsonMap {
    /// A map value from `(name, value)` pairs.
    pub fn value<K: Into<Cow<'static, str>>>(
        members: impl IntoIterator<Item = (K, Value)>,
    ) -> Value {
        Value::from_object(JsonMap(
            members.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        ))
    }

    fn member(&self, name: &str) -> Option<Value> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

impl Object for JsonMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.member(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        self.member(key)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| Value::from(&**k)).collect())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// The environment's formatter: JSON for JSON-escaped templates, minijinja's default otherwise.
pub fn formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    if state.auto_escape() != AutoEscape::Json || value.is_safe() {
        return minijinja::escape_formatter(out, state, value);
    }
    write_json(out, value)
}

fn write_failed(_: std::fmt::Error) -> Error {
    Error::new(ErrorKind::WriteFailure, "cannot write template output")
}

/// Writes a template value as JSON.
pub fn write_json<W: Write>(out: &mut W, value: &Value) -> Result<(), Error> {
    if let Some(d) = value.downcast_object_ref::<DecimalValue>() {
        return write_decimal(out, &d.0).map_err(write_failed);
    }
    if let Some(map) = value.downcast_object_ref::<JsonMap>() {
        out.write_char('{').map_err(write_failed)?;
        for (i, (k, v)) in map.0.iter().enumerate() {
            if i > 0 {
                out.write_char(',').map_err(write_failed)?;
            }
            escape_str(out, k).map_err(write_failed)?;
            out.write_char(':').map_err(write_failed)?;
            write_json(out, v)?;
        }
        return out.write_char('}').map_err(write_failed);
    }
    match value.kind() {
        ValueKind::Undefined => {
            return Err(Error::new(
                ErrorKind::UndefinedError,
                "an undefined value cannot be written",
            ));
        }
        ValueKind::None => out.write_str("null").map_err(write_failed)?,
        ValueKind::Bool => out
            .write_str(if value.is_true() { "true" } else { "false" })
            .map_err(write_failed)?,
        ValueKind::Number => {
            if let Some(i) = value.as_i64() {
                write!(out, "{i}").map_err(write_failed)?;
            } else {
                let text = value.to_string();
                if text.parse::<f64>().map_or(true, |f| !f.is_finite()) {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "a number that JSON cannot hold (NaN or infinite)",
                    ));
                }
                out.write_str(&text).map_err(write_failed)?;
            }
        }
        ValueKind::String => {
            escape_str(out, value.as_str().unwrap_or_default()).map_err(write_failed)?
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.write_char('[').map_err(write_failed)?;
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.write_char(',').map_err(write_failed)?;
                }
                write_json(out, &item)?;
            }
            out.write_char(']').map_err(write_failed)?;
        }
        ValueKind::Map => {
            out.write_char('{').map_err(write_failed)?;
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.write_char(',').map_err(write_failed)?;
                }
                match key.as_str() {
                    Some(k) => escape_str(out, k),
                    None => escape_str(out, &key.to_string()),
                }
                .map_err(write_failed)?;
                out.write_char(':').map_err(write_failed)?;
                write_json(out, &value.get_item(&key)?)?;
            }
            out.write_char('}').map_err(write_failed)?;
        }
        ValueKind::Plain => escape_str(out, &value.to_string()).map_err(write_failed)?,
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("a {} value cannot be written as JSON", value.kind()),
            ));
        }
    }
    Ok(())
}

/// A decimal as a JSON number with its scale (`12.50`), as `Decimal`'s `Display` writes it,
/// from its mantissa without the formatting machinery.
pub fn write_decimal<W: Write>(out: &mut W, d: &rust_decimal::Decimal) -> std::fmt::Result {
    let mantissa = d.mantissa();
    if mantissa == 0 {
        // Signed zeros and zeros with a scale keep Display's exact layout.
        return write!(out, "{d}");
    }
    let scale = d.scale() as usize;
    // 96-bit mantissa: at most 29 digits; with "-0." and up to 28 zeros, 64 bytes are enough.
    let mut digits = [0u8; 40];
    let mut n = mantissa.unsigned_abs();
    let mut len = 0;
    while n > 0 {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
    }
    let mut buf = [0u8; 80];
    let mut at = 0;
    let mut put = |b: u8| {
        buf[at] = b;
        at += 1;
    };
    if mantissa < 0 {
        put(b'-');
    }
    if scale >= len {
        put(b'0');
        put(b'.');
        for _ in 0..scale - len {
            put(b'0');
        }
        for i in (0..len).rev() {
            put(digits[i]);
        }
    } else {
        for i in (0..len).rev() {
            if i + 1 == scale {
                put(b'.');
            }
            put(digits[i]);
        }
    }
    // Only ASCII digits, '-' and '.' were written.
    out.write_str(std::str::from_utf8(&buf[..at]).map_err(|_| std::fmt::Error)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn env() -> minijinja::Environment<'static> {
        let mut env = minijinja::Environment::new();
        env.set_formatter(formatter);
        env.add_template("t.json.j2", r#"{"a": {{ a }}, "b": {{ b }}, "c": {{ c }}}"#)
            .expect("template");
        env
    }

    #[test]
    fn quotes_and_backslashes_cannot_break_the_document() {
        let env = env();
        let out = env
            .get_template("t.json.j2")
            .expect("t")
            .render(minijinja::context! { a => "O\"Brien \\ \n", b => vec![1, 2], c => () })
            .expect("render");
        let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(v["a"], "O\"Brien \\ \n");
        assert_eq!(v["b"], serde_json::json!([1, 2]));
    }

    #[test]
    fn decimals_are_written_as_display_writes_them() {
        for text in [
            "12.50",
            "-12.50",
            "0.05",
            "-0.0005",
            "7",
            "-7",
            "100",
            "1.000",
            "0.1",
            "0",
            "0.00",
            "79228162514264337593543950335",
            "-7.9228162514264337593543950335",
            "0.0000000000000000000000000001",
        ] {
            let d = rust_decimal::Decimal::from_str(text).expect(text);
            let mut out = String::new();
            write_decimal(&mut out, &d).expect("write");
            assert_eq!(out, d.to_string(), "{text}");
            assert_eq!(out, text);
        }
    }

    #[test]
    fn strings_are_escaped_for_json() {
        let mut out = String::new();
        escape_str(&mut out, "a\"b\\c\nd\re\tf\u{1}g é").expect("write");
        assert_eq!(out, r#""a\"b\\c\nd\re\tf\u0001g é""#);
        let back: String = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(back, "a\"b\\c\nd\re\tf\u{1}g é");
    }

    #[test]
    fn decimals_are_numbers_with_their_scale() {
        let env = env();
        let d = Value::from_object(DecimalValue(
            rust_decimal::Decimal::from_str("12.50").expect("d"),
        ));
        let m = Value::from_iter([("value", d.clone())]);
        let out = env
            .get_template("t.json.j2")
            .expect("t")
            .render(minijinja::context! { a => d, b => m, c => 1.5 })
            .expect("render");
        assert_eq!(out, r#"{"a": 12.50, "b": {"value":12.50}, "c": 1.5}"#);
        let v: serde_json::Value = serde_json::from_str(&out).expect("valid");
        assert_eq!(serde_json::to_string(&v["a"]).expect("s"), "12.50");
    }
}
