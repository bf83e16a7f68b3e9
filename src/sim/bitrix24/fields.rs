//! Field lists (`tasks.task.getFields`, `crm.activity.fields`, `crm.lead.fields`) and the user
//! fields (`UF_*`) kept on what ubsync writes, so field mapping can be checked end to end.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// The user fields every simulated portal has on tasks, activities and leads (besides
/// `UF_CRM_TASK` on tasks).
pub const USER_FIELDS: &[&str] = &["UF_CRM_CALL_SOURCE", "UF_CRM_CALL_LINE"];

const TASK_FIELDS: &[&str] = &[
    "ID",
    "TITLE",
    "DESCRIPTION",
    "DEADLINE",
    "RESPONSIBLE_ID",
    "CREATED_BY",
    "PRIORITY",
    "GROUP_ID",
    "XML_ID",
    "STATUS",
    "UF_CRM_TASK",
];
const ACTIVITY_FIELDS: &[&str] = &[
    "ID",
    "OWNER_ID",
    "OWNER_TYPE_ID",
    "TYPE_ID",
    "SUBJECT",
    "START_TIME",
    "END_TIME",
    "COMPLETED",
    "DIRECTION",
    "PRIORITY",
    "RESPONSIBLE_ID",
    "DESCRIPTION",
    "DESCRIPTION_TYPE",
    "COMMUNICATIONS",
    "ORIGINATOR_ID",
    "ORIGIN_ID",
    "PROVIDER_ID",
];
const LEAD_FIELDS: &[&str] = &[
    "ID",
    "TITLE",
    "NAME",
    "PHONE",
    "SOURCE_ID",
    "ASSIGNED_BY_ID",
    "ORIGINATOR_ID",
    "ORIGIN_ID",
    "COMMENTS",
];

fn describe(names: &[&str]) -> Map<String, Value> {
    names
        .iter()
        .chain(USER_FIELDS)
        .map(|n| {
            let user = n.starts_with("UF_");
            (
                n.to_string(),
                json!({"type": if user { "string" } else { "char" }, "isRequired": false,
                       "isReadOnly": *n == "ID", "isMultiple": false,
                       "title": n, "formLabel": if user { Value::String(n.to_string()) } else { Value::Null }}),
            )
        })
        .collect()
}

/// `tasks.task.getFields`: `{"fields": {...}}`.
pub fn task_fields() -> Value {
    json!({ "fields": describe(TASK_FIELDS) })
}

/// `crm.activity.fields` and `crm.lead.fields`: the field map itself.
pub fn crm_fields(lead: bool) -> Value {
    Value::Object(describe(if lead { LEAD_FIELDS } else { ACTIVITY_FIELDS }))
}

/// The `UF_*` values of a write (`UF_CRM_TASK` excepted), as strings.
pub fn user_values(fields: &Map<String, Value>) -> BTreeMap<String, String> {
    fields
        .iter()
        .filter(|(k, _)| {
            k.to_uppercase().starts_with("UF_") && !k.eq_ignore_ascii_case("UF_CRM_TASK")
        })
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.to_uppercase(), text)
        })
        .collect()
}
