//! `tasks.task.add` / `update` / `complete` / `get` / `list` (`bitrix24-api.md` §6): missed-call
//! tasks, found again by `XML_ID` or by the call key at the end of their description.

use serde_json::{json, Map, Value};

use crate::bitrix24::batch::Command;
use crate::bitrix24::wire::{as_i64, as_text};

/// `tasks.task.add` of a missed call's task.
pub struct NewTask {
    pub title: String,
    pub description: String,
    pub responsible: i64,
    /// RFC 3339 with the portal's offset.
    pub deadline: String,
    /// `unitalk-<id>`.
    pub xml_id: String,
    /// `UF_CRM_TASK` binding (`C_5`).
    pub crm_binding: Option<String>,
    /// Rendered `rules.fields.task`.
    pub extra: Map<String, Value>,
}

impl NewTask {
    pub fn command(self, key: impl Into<String>) -> Command {
        let mut fields = json!({
            "TITLE": self.title,
            "DESCRIPTION": self.description,
            "RESPONSIBLE_ID": self.responsible,
            "DEADLINE": self.deadline,
            "XML_ID": self.xml_id,
        });
        if let Some(b) = self.crm_binding {
            fields["UF_CRM_TASK"] = json!([b]);
        }
        if let Value::Object(m) = &mut fields {
            m.extend(self.extra);
        }
        Command::new(key, "tasks.task.add", json!({ "fields": fields }))
    }
}

/// `tasks.task.update` of a task's description (rewritten whole).
pub fn update_description(key: impl Into<String>, task_id: i64, description: String) -> Command {
    Command::new(
        key,
        "tasks.task.update",
        json!({"taskId": task_id, "fields": {"DESCRIPTION": description}}),
    )
}

/// `tasks.task.complete` (completing a completed task changes nothing).
pub fn complete(key: impl Into<String>, task_id: i64) -> Command {
    Command::new(key, "tasks.task.complete", json!({"taskId": task_id}))
}

/// `tasks.task.get` of one task.
pub fn get(key: impl Into<String>, task_id: i64) -> Command {
    Command::new(key, "tasks.task.get", json!({"taskId": task_id}))
}

/// The parameters of one page of tasks created at or after `created_from` (RFC 3339), of one
/// responsible user if given, in a stable order so pages do not shift.
pub fn list_created_since(
    created_from: &str,
    responsible: Option<i64>,
    start: Option<u64>,
) -> Value {
    let mut filter = json!({">=CREATED_DATE": created_from});
    if let Some(r) = responsible {
        filter["RESPONSIBLE_ID"] = json!(r);
    }
    let mut p = json!({"filter": filter, "order": {"ID": "asc"}, "select": ["ID", "XML_ID", "DESCRIPTION"]});
    if let Some(s) = start {
        p["start"] = json!(s);
    }
    p
}

/// The task id of an `add` or `get` answer (`{"task": {"id": "31"}}`).
pub fn task_id(v: &Value) -> Option<i64> {
    v.get("task").and_then(|t| t.get("id")).and_then(as_i64)
}

/// A task as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub id: Option<i64>,
    pub xml_id: Option<String>,
    pub description: Option<String>,
}

impl TaskRow {
    /// Whether this is the task of the call with key `ext` (its `XML_ID`, or the key in the
    /// description where a portal does not keep `XML_ID`).
    pub fn is_for(&self, ext: &str) -> bool {
        self.xml_id.as_deref() == Some(ext)
            || self.description.as_deref().is_some_and(|d| d.contains(ext))
    }
}

/// A `tasks.task.list` answer's tasks (`{"tasks": [...]}`; field names in camelCase).
pub fn listed_tasks(v: &Value) -> Vec<TaskRow> {
    v.get("tasks")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| TaskRow {
                    id: t.get("id").and_then(as_i64),
                    xml_id: t.get("xmlId").and_then(as_text),
                    description: t.get("description").and_then(as_text),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_found_by_xml_id_or_by_the_key_in_their_description() {
        let rows = listed_tasks(&json!({"tasks": [
            {"id": "31", "xmlId": "unitalk-7", "description": "x"},
            {"id": 32, "xmlId": null, "description": "Missed call\n\n[unitalk-8]"},
        ]}));
        assert_eq!(rows[0].id, Some(31));
        assert!(rows[0].is_for("unitalk-7") && !rows[0].is_for("unitalk-8"));
        assert!(rows[1].is_for("unitalk-8"));
        assert!(listed_tasks(&json!([])).is_empty());
        assert_eq!(task_id(&json!({"task": {"id": "31"}})), Some(31));
        assert_eq!(task_id(&json!({"task": {}})), None);
    }

    #[test]
    fn a_task_is_bound_to_its_client_and_keeps_the_rules_fields() {
        let mut extra = Map::new();
        extra.insert("UF_AUTO_1".into(), json!("v"));
        let c = NewTask {
            title: "t".into(),
            description: "d".into(),
            responsible: 5,
            deadline: "dl".into(),
            xml_id: "unitalk-7".into(),
            crm_binding: Some("C_5".into()),
            extra,
        }
        .command("t_7");
        assert_eq!(c.params["fields"]["UF_CRM_TASK"], json!(["C_5"]));
        assert_eq!(c.params["fields"]["UF_AUTO_1"], json!("v"));
        let p = list_created_since("2026-11-22T12:00:00+02:00", Some(5), Some(50));
        assert_eq!(p["filter"]["RESPONSIBLE_ID"], json!(5));
        assert_eq!(p["start"], json!(50));
    }
}
