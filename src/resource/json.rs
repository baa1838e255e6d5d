//! Rendered resources as JSON trees that borrow from the rendered text.
//!
//! The mapping stage parses every rendered resource, strips its nulls, validates it and writes it
//! back as compact JSON. [`Node`] does that without a map or a string per member: strings point
//! into the rendered text (unless they hold an escape), objects are member lists in the order the
//! template wrote them, and numbers keep their text, so `12.50` stays `12.50`.
//!
//! [`write_compact`] writes exactly what `serde_json` writes for the same document (with the
//! `preserve_order` and `arbitrary_precision` features the crate uses), so files and hashes do
//! not depend on which of the two produced them.

use std::borrow::Cow;
use std::fmt;

/// A JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum Node<'a> {
    Null,
    Bool(bool),
    /// The number's text as written (valid JSON number syntax).
    Number(Cow<'a, str>),
    String(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    Object(Object<'a>),
}

/// A JSON object: its members in document order. Member names are unique.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Object<'a> {
    members: Vec<(Cow<'a, str>, Node<'a>)>,
}

impl<'a> Object<'a> {
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        self.members.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node<'a>)> {
        self.members.iter().map(|(k, v)| (&**k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|(k, _)| &**k)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn retain_mut(&mut self, mut keep: impl FnMut(&str, &mut Node<'a>) -> bool) {
        self.members.retain_mut(|(k, v)| keep(k, v));
    }
}

impl<'o, 'a> IntoIterator for &'o Object<'a> {
    type Item = (&'o str, &'o Node<'a>);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'o, (Cow<'a, str>, Node<'a>)>,
        fn(&'o (Cow<'a, str>, Node<'a>)) -> (&'o str, &'o Node<'a>),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.members.iter().map(|(k, v)| (&**k, v))
    }
}

impl<'a> Node<'a> {
    /// An object's member.
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        self.as_object()?.get(key)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Object<'a>> {
        match self {
            Node::Object(o) => Some(o),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Node<'a>]> {
        match self {
            Node::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Node::Number(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Node::Number(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Node::Null)
    }

    pub fn is_number(&self) -> bool {
        matches!(self, Node::Number(_))
    }

    /// A tree borrowing from a `serde_json` value (for resources that arrive as one).
    pub fn from_value(v: &'a serde_json::Value) -> Node<'a> {
        use serde_json::Value as J;
        match v {
            J::Null => Node::Null,
            J::Bool(b) => Node::Bool(*b),
            J::Number(n) => Node::Number(Cow::Borrowed(n.as_str())),
            J::String(s) => Node::String(Cow::Borrowed(s)),
            J::Array(items) => Node::Array(items.iter().map(Node::from_value).collect()),
            J::Object(map) => Node::Object(Object {
                members: map
                    .iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Node::from_value(v)))
                    .collect(),
            }),
        }
    }
}

/// Why a text is not a JSON document, and where (1-based line and column of the offending
/// character). The message never quotes the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub kind: ParseErrorKind,
    pub line: usize,
    pub column: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// The text ended inside a value.
    Eof,
    /// Anything else: a stray character, a bad escape or number, a duplicate member.
    Syntax(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ParseErrorKind::Eof => f.write_str("unexpected end of output")?,
            ParseErrorKind::Syntax(what) => write!(f, "syntax error ({what})")?,
        }
        write!(f, " at line {} column {}", self.line, self.column)
    }
}

impl std::error::Error for ParseError {}

/// Bytes a string scan stops at: `"`, `\\` and the control characters.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Where the next special byte of `bytes` is, if any. Eight bytes are tested at a time while
/// none of them can be special (most strings have no special byte at all), then the table
/// decides byte by byte.
pub(crate) fn next_special(bytes: &[u8]) -> Option<usize> {
    let mut skipped = 0;
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        if may_hold_special(u64::from_le_bytes(word)) {
            break;
        }
        skipped += 8;
    }
    bytes[skipped..]
        .iter()
        .position(|&b| SPECIAL[usize::from(b)])
        .map(|p| p + skipped)
}

/// True when one of the eight bytes of `w` may be `"`, `\\` or below 0x20: never false when
/// one is (it may be true when none is, which only costs a byte-by-byte look).
fn may_hold_special(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte below `n` (n ≤ 0x80) leaves its high bit set in `(x - n) & !x`.
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    (below(w, 0x20) | below(quote, 1) | below(backslash, 1)) != 0
}

/// Deepest nesting accepted (as serde_json, which stops at 128).
const MAX_DEPTH: usize = 128;

/// Parses one JSON document; only whitespace may follow it.
pub fn parse(text: &str) -> Result<Node<'_>, ParseError> {
    let mut p = Parser {
        text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    p.skip_ws();
    let v = p.value(0)?;
    p.skip_ws();
    if p.pos < p.bytes.len() {
        return Err(p.error("trailing characters"));
    }
    Ok(v)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn error_at(&self, pos: usize, kind: ParseErrorKind) -> ParseError {
        let before = &self.bytes[..pos.min(self.bytes.len())];
        let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let column = 1 + self.text[line_start..pos.min(self.text.len())]
            .chars()
            .count();
        ParseError { kind, line, column }
    }

    fn error(&self, what: &'static str) -> ParseError {
        if self.pos >= self.bytes.len() {
            return self.error_at(self.pos, ParseErrorKind::Eof);
        }
        self.error_at(self.pos, ParseErrorKind::Syntax(what))
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        let rest = &self.bytes[self.pos.min(self.bytes.len())..];
        self.pos += rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
            .unwrap_or(rest.len());
    }

    fn literal(&mut self, word: &'static str, node: Node<'a>) -> Result<Node<'a>, ParseError> {
        let end = self.pos + word.len();
        match self.bytes.get(self.pos..end) {
            Some(b) if b == word.as_bytes() => {
                self.pos = end;
                Ok(node)
            }
            _ => {
                // Point at the first character that differs (or the end).
                let word = word.as_bytes();
                let same = word
                    .iter()
                    .zip(&self.bytes[self.pos..])
                    .take_while(|(a, b)| a == b)
                    .count();
                self.pos += same;
                Err(self.error("expected a value"))
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node<'a>, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => Ok(Node::String(self.string()?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true", Node::Bool(true)),
            Some(b'f') => self.literal("false", Node::Bool(false)),
            Some(b'n') => self.literal("null", Node::Null),
            _ => Err(self.error("expected a value")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Node<'a>, ParseError> {
        self.pos += 1;
        let mut members: Vec<(Cow<'a, str>, Node<'a>)> = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Node::Object(Object { members }));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a member name"));
            }
            let key_at = self.pos;
            let key = self.string()?;
            if members.iter().any(|(k, _)| *k == key) {
                return Err(self.error_at(key_at, ParseErrorKind::Syntax("duplicate member")));
            }
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.error("expected `:`"));
            }
            self.pos += 1;
            self.skip_ws();
            let v = self.value(depth + 1)?;
            members.push((key, v));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Node::Object(Object { members }));
                }
                _ => return Err(self.error("expected `,` or `}`")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Node<'a>, ParseError> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Node::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Node::Array(items));
                }
                _ => return Err(self.error("expected `,` or `]`")),
            }
        }
    }

    fn number(&mut self) -> Result<Node<'a>, ParseError> {
        let start = self.pos;
        let digits = |p: &mut Parser<'a>| {
            let from = p.pos;
            while let Some(b'0'..=b'9') = p.peek() {
                p.pos += 1;
            }
            p.pos - from
        };
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(self.error("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if digits(self) == 0 {
                return Err(self.error("invalid number"));
            }
        }
        let Some(b'e' | b'E') = self.peek() else {
            return Ok(Node::Number(Cow::Borrowed(&self.text[start..self.pos])));
        };
        let mantissa_end = self.pos;
        self.pos += 1;
        let sign = match self.peek() {
            Some(b'-') => {
                self.pos += 1;
                "-"
            }
            Some(b'+') => {
                self.pos += 1;
                "+"
            }
            _ => "+",
        };
        let exponent_start = self.pos;
        if digits(self) == 0 {
            return Err(self.error("invalid number"));
        }
        // Written as serde_json writes it: `e`, then the sign.
        Ok(Node::Number(Cow::Owned(format!(
            "{}e{sign}{}",
            &self.text[start..mantissa_end],
            &self.text[exponent_start..self.pos]
        ))))
    }

    /// A string literal at `pos` (which holds `"`): borrowed when it has no escape.
    fn string(&mut self) -> Result<Cow<'a, str>, ParseError> {
        self.pos += 1;
        let start = self.pos;
        match next_special(&self.bytes[start..]) {
            None => {
                self.pos = self.bytes.len();
                return Err(self.error("unterminated string"));
            }
            Some(n) => self.pos += n,
        }
        match self.peek() {
            Some(b'"') => {
                let s = &self.text[start..self.pos];
                self.pos += 1;
                return Ok(Cow::Borrowed(s));
            }
            Some(b'\\') => {}
            _ => return Err(self.error("control character in a string")),
        }
        // An escape: copy what came before it, then decode the rest.
        let mut out = String::from(&self.text[start..self.pos]);
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.pos += 1;
                            out.push(self.unicode_escape()?);
                            continue;
                        }
                        _ => return Err(self.error("invalid escape")),
                    };
                    out.push(c);
                    self.pos += 1;
                }
                Some(0..=0x1f) => return Err(self.error("control character in a string")),
                Some(_) => {
                    // Copy the run up to the next quote, backslash or control character.
                    let run_start = self.pos;
                    self.pos += next_special(&self.bytes[run_start..])
                        .unwrap_or(self.bytes.len() - run_start);
                    out.push_str(&self.text[run_start..self.pos]);
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let mut n = 0;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                _ => return Err(self.error("invalid \\u escape")),
            };
            n = n * 16 + u32::from(d);
            self.pos += 1;
        }
        Ok(n)
    }

    /// The character of a `\uXXXX` escape (after `\u`), with its low surrogate if it is a high one.
    fn unicode_escape(&mut self) -> Result<char, ParseError> {
        let first = self.hex4()?;
        let code = match first {
            0xD800..=0xDBFF => {
                if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return Err(self.error("lone surrogate in a \\u escape"));
                }
                self.pos += 2;
                let second = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return Err(self.error("lone surrogate in a \\u escape"));
                }
                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.error("lone surrogate in a \\u escape")),
            n => n,
        };
        char::from_u32(code).ok_or_else(|| self.error("invalid \\u escape"))
    }
}

/// Removes `null` members and array items, then the objects and arrays left empty, so that a
/// template can write `"birthDate": {{ row.birth_date | date }}` and an empty cell leaves the
/// element out (FHIR JSON forbids `null` and empty objects/arrays). Returns whether `v` itself
/// ended up empty.
pub fn strip_nulls(v: &mut Node<'_>) -> bool {
    match v {
        Node::Null => true,
        Node::Object(o) => {
            o.retain_mut(|_, child| !strip_nulls(child));
            o.is_empty()
        }
        Node::Array(items) => {
            items.retain_mut(|child| !strip_nulls(child));
            items.is_empty()
        }
        Node::String(_) | Node::Number(_) | Node::Bool(_) => false,
    }
}

/// Appends `v` as compact JSON, byte for byte as `serde_json::to_string` writes it.
pub fn write_compact(out: &mut String, v: &Node<'_>) {
    match v {
        Node::Null => out.push_str("null"),
        Node::Bool(true) => out.push_str("true"),
        Node::Bool(false) => out.push_str("false"),
        Node::Number(n) => out.push_str(n),
        Node::String(s) => write_string(out, s),
        Node::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_compact(out, item);
            }
            out.push(']');
        }
        Node::Object(o) => {
            out.push('{');
            for (i, (k, v)) in o.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, k);
                out.push(':');
                write_compact(out, v);
            }
            out.push('}');
        }
    }
}

/// A JSON string literal escaped as serde_json escapes it: `"` and `\` with a backslash, the
/// control characters as `\b \t \n \f \r` or `\u00XX`, everything else as it is. Runs that need
/// no escape are copied whole. The one string escaper of the crate: resources, template output
/// and ledger hashes all go through it.
pub fn write_escaped<W: fmt::Write>(out: &mut W, s: &str) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.write_char('"')?;
    let bytes = s.as_bytes();
    let mut start = 0;
    while let Some(n) = next_special(&bytes[start..]) {
        let i = start + n;
        // Every special byte is ASCII, so `start..i` falls on character boundaries.
        out.write_str(&s[start..i])?;
        let b = bytes[i];
        match b {
            b'"' => out.write_str("\\\"")?,
            b'\\' => out.write_str("\\\\")?,
            0x08 => out.write_str("\\b")?,
            0x09 => out.write_str("\\t")?,
            0x0a => out.write_str("\\n")?,
            0x0c => out.write_str("\\f")?,
            0x0d => out.write_str("\\r")?,
            _ => {
                out.write_str("\\u00")?;
                out.write_char(char::from(HEX[usize::from(b >> 4)]))?;
                out.write_char(char::from(HEX[usize::from(b & 0xf)]))?;
            }
        }
        start = i + 1;
    }
    out.write_str(&s[start..])?;
    out.write_char('"')
}

/// [`write_escaped`] into a `String`, which cannot fail.
fn write_string(out: &mut String, s: &str) {
    let _ = write_escaped(out, s);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    fn compact(text: &str) -> String {
        let mut out = String::new();
        write_compact(&mut out, &parse(text).unwrap());
        out
    }

    fn serde_compact(text: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        serde_json::to_string(&v).unwrap()
    }

    #[test]
    fn writes_what_serde_json_writes() {
        let docs = [
            r#"{"resourceType": "Observation", "valueQuantity": {"value": 12.50, "unit": "g/dL"}}"#,
            r#"[1, -0.5, 1e3, 2.0E-7, true, false, null, "", {}, []]"#,
            r#"{"a": "O\"Brien \\ \/ \n\t\r\b\f \u0001 \u001f é 漢 \ud83d\ude00", "b": "plain"}"#,
            "{\n  \"z\": 1,\n  \"a\": [ {\"m\": \"x\"} ]\n}\n",
            r#""\u00e9\u2028""#,
            "123456789012345678901234567890.000",
        ];
        for d in docs {
            assert_eq!(compact(d), serde_compact(d), "{d}");
        }
    }

    #[test]
    fn special_bytes_are_found_wherever_they_are() {
        let specials = [b'"', b'\\', 0x00, 0x01, 0x1f];
        let plain = [
            b'a', b' ', 0x7f, 0x80, 0xc3, 0xff, b'!', b'#', b'[', b']', 0x20, 0x21,
        ];
        for len in 0..20 {
            for &p in &plain {
                let mut bytes = vec![p; len];
                assert_eq!(next_special(&bytes), None, "{bytes:?}");
                for at in 0..len {
                    for &sp in &specials {
                        bytes[at] = sp;
                        assert_eq!(next_special(&bytes), Some(at), "{bytes:?}");
                        // A second special byte later does not hide the first.
                        if at + 1 < len {
                            bytes[len - 1] = b'"';
                            assert_eq!(next_special(&bytes), Some(at), "{bytes:?}");
                            bytes[len - 1] = p;
                        }
                        bytes[at] = p;
                    }
                }
            }
        }
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let v = parse(r#"{"a": "plain", "b": "tab\tx"}"#).unwrap();
        assert!(matches!(
            v.get("a"),
            Some(Node::String(Cow::Borrowed("plain")))
        ));
        assert!(matches!(v.get("b"), Some(Node::String(Cow::Owned(s))) if s == "tab\tx"));
    }

    #[test]
    fn what_serde_json_refuses_is_refused_with_its_position() {
        for bad in [
            "{\"a\": 1,}",
            "{\"a\" 1}",
            "[1 2]",
            "{\"a\": 01}",
            "{\"a\": 1.}",
            "{\"a\": -}",
            "{\"a\": tru}",
            "\"a\u{1}\"",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "{} x",
            "",
            "{\"a\": [1,",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
            assert!(
                serde_json::from_str::<serde_json::Value>(bad).is_err(),
                "{bad:?}"
            );
        }
        let e = parse("{\n  \"a\": 1,\n  \"b\" 2\n}").unwrap_err();
        assert_eq!((e.line, e.column), (3, 7));
        assert_eq!(
            e.to_string(),
            "syntax error (expected `:`) at line 3 column 7"
        );
        let e = parse("{\"a\": [1,").unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::Eof);
        assert_eq!(
            e.to_string(),
            "unexpected end of output at line 1 column 10"
        );
    }

    #[test]
    fn duplicate_members_are_refused() {
        let e = parse(r#"{"a": 1, "a": 2}"#).unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::Syntax("duplicate member"));
        assert_eq!(e.column, 10);
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = "[".repeat(MAX_DEPTH + 2);
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn nulls_and_what_they_leave_empty_are_removed() {
        let mut v = parse(
            r#"{"a": null, "b": {"c": null}, "d": [null, {"e": null}], "f": [1, null], "g": "x"}"#,
        )
        .unwrap();
        strip_nulls(&mut v);
        let mut out = String::new();
        write_compact(&mut out, &v);
        assert_eq!(out, r#"{"f":[1],"g":"x"}"#);
    }

    #[test]
    fn serde_values_are_borrowed_as_they_are() {
        let v = serde_json::json!({"b": [1.50, "x"], "a": {"c": null}});
        let n = Node::from_value(&v);
        let mut out = String::new();
        write_compact(&mut out, &n);
        assert_eq!(out, serde_json::to_string(&v).unwrap());
    }
}
