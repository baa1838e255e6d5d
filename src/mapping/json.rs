//! JSON output of templates: the formatter that writes `{{ … }}` values into `*.json.j2`
//! templates, and the clean-up of rendered documents.
//!
//! minijinja's own JSON escaping goes through serde, which would turn a decimal into a string;
//! this formatter writes [`DecimalValue`]s as bare JSON numbers with their scale, and everything
//! else as proper JSON (strings escaped, so a quote or backslash in a value cannot break the
//! document). It must not be used for anything but template output.

use minijinja::value::{Value, ValueKind};
use minijinja::{AutoEscape, Error, ErrorKind, Output, State};

use super::filters::DecimalValue;

/// The environment's formatter: JSON for JSON-escaped templates, minijinja's default otherwise.
pub fn formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    if state.auto_escape() != AutoEscape::Json || value.is_safe() {
        return minijinja::escape_formatter(out, state, value);
    }
    let mut buf = String::new();
    write_json(&mut buf, value)?;
    out.write_str(&buf)
        .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write template output"))
}

/// Writes a template value as JSON.
pub fn write_json(buf: &mut String, value: &Value) -> Result<(), Error> {
    if let Some(d) = value.downcast_object_ref::<DecimalValue>() {
        buf.push_str(&d.0.to_string());
        return Ok(());
    }
    match value.kind() {
        ValueKind::Undefined => {
            return Err(Error::new(
                ErrorKind::UndefinedError,
                "an undefined value cannot be written",
            ));
        }
        ValueKind::None => buf.push_str("null"),
        ValueKind::Bool => buf.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let text = value.to_string();
            if text.parse::<f64>().map_or(true, |f| !f.is_finite()) {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "a number that JSON cannot hold (NaN or infinite)",
                ));
            }
            buf.push_str(&text);
        }
        ValueKind::String => escape_str(buf, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            buf.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    buf.push(',');
                }
                write_json(buf, &item)?;
            }
            buf.push(']');
        }
        ValueKind::Map => {
            buf.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    buf.push(',');
                }
                match key.as_str() {
                    Some(k) => escape_str(buf, k),
                    None => escape_str(buf, &key.to_string()),
                }
                buf.push(':');
                write_json(buf, &value.get_item(&key)?)?;
            }
            buf.push('}');
        }
        ValueKind::Plain => escape_str(buf, &value.to_string()),
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("a {} value cannot be written as JSON", value.kind()),
            ));
        }
    }
    Ok(())
}

/// A JSON string literal.
pub fn escape_str(buf: &mut String, s: &str) {
    buf.push('"');
    for c in s.chars() {
        match c {
            '"' => buf.push_str("\\\""),
            '\\' => buf.push_str("\\\\"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            '\t' => buf.push_str("\\t"),
            c if (c as u32) < 0x20 => buf.push_str(&format!("\\u{:04x}", c as u32)),
            c => buf.push(c),
        }
    }
    buf.push('"');
}

/// Removes `null` members and array items, then the objects and arrays left empty, so that a
/// template can write `"birthDate": {{ row.birth_date | date }}` and an empty cell leaves the
/// element out (FHIR JSON forbids `null` and empty objects/arrays). Returns whether `v` itself
/// ended up empty.
pub fn strip_nulls(v: &mut serde_json::Value) -> bool {
    use serde_json::Value as J;
    match v {
        J::Null => true,
        J::Object(map) => {
            map.retain(|_, child| !strip_nulls(child));
            map.is_empty()
        }
        J::Array(items) => {
            items.retain_mut(|child| !strip_nulls(child));
            items.is_empty()
        }
        J::String(_) | J::Number(_) | J::Bool(_) => false,
    }
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

    #[test]
    fn nulls_and_what_they_leave_empty_are_removed() {
        let mut v = serde_json::json!({
            "a": null, "b": {"c": null}, "d": [null, {"e": null}], "f": [1, null], "g": "x"
        });
        strip_nulls(&mut v);
        assert_eq!(v, serde_json::json!({"f": [1], "g": "x"}));
    }
}
