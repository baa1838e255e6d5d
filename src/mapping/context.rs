//! The template context of one row: `row`, `patient_key`, `record_key`, `identifier`,
//! `patient_ref`, `center`, `mapping`, `timezone` and, for a wide column, `item`.
//!
//! Both the context and `row` are objects with fixed members that templates read by name, so a
//! render builds no map per row: a member is found by a `match` on its name, a cell by its
//! column's position in the header.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value as JValue};

use crate::source::{Header, Row, Value};

use super::filters::DecimalValue;

/// The members of [`RowContext`], in the order `fhirlift render` shows them.
const MEMBERS: [&str; 9] = [
    "row",
    "patient_key",
    "record_key",
    "identifier",
    "patient_ref",
    "center",
    "mapping",
    "timezone",
    "item",
];

/// The root context of one render.
#[derive(Debug)]
pub(super) struct RowContext {
    pub row: JValue,
    pub patient_key: JValue,
    pub record_key: JValue,
    pub identifier: JValue,
    pub patient_ref: JValue,
    pub center: JValue,
    pub mapping: JValue,
    pub timezone: JValue,
    pub item: Option<JValue>,
}

impl RowContext {
    fn member(&self, name: &str) -> Option<&JValue> {
        Some(match name {
            "row" => &self.row,
            "patient_key" => &self.patient_key,
            "record_key" => &self.record_key,
            "identifier" => &self.identifier,
            "patient_ref" => &self.patient_ref,
            "center" => &self.center,
            "mapping" => &self.mapping,
            "timezone" => &self.timezone,
            "item" => return self.item.as_ref(),
            _ => return None,
        })
    }
}

impl Object for RowContext {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        self.member(key.as_str()?).cloned()
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<JValue> {
        self.member(key).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let present = MEMBERS.iter().filter(|m| self.member(m).is_some());
        Enumerator::Values(present.map(|m| JValue::from(*m)).collect())
    }
}

/// `row` in a template: the cells in header order, read by column name.
#[derive(Debug)]
pub(super) struct RowValues {
    header: Arc<Header>,
    values: Vec<JValue>,
}

impl RowValues {
    pub fn value(row: &Row) -> JValue {
        JValue::from_object(RowValues {
            header: row.header.clone(),
            values: row.values.iter().map(cell_value).collect(),
        })
    }

    fn cell(&self, column: &str) -> Option<JValue> {
        let i = self.header.index_of(column)?;
        self.values.get(i).cloned()
    }
}

impl Object for RowValues {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        self.cell(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<JValue> {
        self.cell(key)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.header
                .columns
                .iter()
                .map(|c| JValue::from(c.clone()))
                .collect(),
        )
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.header.columns.len())
    }
}

/// A cell as templates see it: text, numbers, booleans as themselves; decimals as
/// [`DecimalValue`] (scale kept); dates and date-times as ISO text (naive ones without an
/// offset, for `dateTime` to place in the source's zone).
pub fn cell_value(v: &Value) -> JValue {
    match v {
        Value::Null => JValue::from(()),
        Value::Text(s) => JValue::from(s.as_str()),
        Value::Integer(i) => JValue::from(*i),
        Value::Decimal(d) => JValue::from_object(DecimalValue(*d)),
        Value::Boolean(b) => JValue::from(*b),
        other => JValue::from(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::RowLocation;

    fn row() -> Row {
        let values = vec![Value::Text("A1".into()), Value::Null];
        Row {
            location: RowLocation {
                file: "labs.csv".into(),
                sheet: None,
                row: 2,
            },
            header: Arc::new(Header::new(["lab_id", "comment"])),
            raw: values.iter().map(|v| v.to_string()).collect(),
            values,
            errors: Vec::new(),
        }
    }

    fn context(item: Option<JValue>) -> JValue {
        JValue::from_object(RowContext {
            row: RowValues::value(&row()),
            patient_key: JValue::from("000101"),
            record_key: JValue::from("A1"),
            identifier: JValue::from(()),
            patient_ref: JValue::from("urn:uuid:x"),
            center: JValue::from(()),
            mapping: JValue::from("labs"),
            timezone: JValue::from("UTC"),
            item,
        })
    }

    #[test]
    fn members_are_read_by_name_and_listed_in_order() {
        let ctx = context(None);
        assert_eq!(ctx.get_attr("record_key").ok(), Some(JValue::from("A1")));
        assert!(ctx.get_attr("item").is_ok_and(|v| v.is_undefined()));
        let names: Vec<String> = ctx
            .try_iter()
            .map(|it| it.map(|k| k.to_string()).collect())
            .unwrap_or_default();
        assert_eq!(names, &MEMBERS[..8]);
        let with_item = context(Some(JValue::from(1)));
        assert_eq!(with_item.try_iter().map(|i| i.count()).ok(), Some(9));
    }

    #[test]
    fn cells_are_read_by_column_name() {
        let ctx = context(None);
        let row = ctx.get_attr("row").unwrap_or_default();
        assert_eq!(row.get_attr("lab_id").ok(), Some(JValue::from("A1")));
        assert!(row.get_attr("comment").is_ok_and(|v| v.is_none()));
        assert!(row.get_attr("nope").is_ok_and(|v| v.is_undefined()));
        assert_eq!(row.len(), Some(2));
    }
}
