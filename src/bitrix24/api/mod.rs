//! Typed Bitrix24 methods: each command ubsync sends is built here from named parameters, and
//! each answer it reads is decoded here into a struct, leniently (strings or numbers, `null`,
//! `{}` for empty, absent fields). The pipeline (`sync/`) never spells a Bitrix24 field name.
//!
//! - `telephony.rs`: `telephony.externalCall.*` and `voximplant.statistic.get`;
//! - `tasks.rs`: `tasks.task.*`;
//! - `crm.rs`: CRM entities and call activities (`crm.activity.*`, `crm.duplicate.findbycomm`);
//! - `users.rs`: `user.get` by inner line and `im.notify.personal.add`;
//! - `events.rs`: delivered telephony events, `event.*` bindings and the offline queue.

pub mod crm;
pub mod events;
pub mod tasks;
pub mod telephony;
pub mod users;

pub use crm::Entity;

use serde_json::Value;

use super::batch::Command;

/// A command whose fields `rules.script` may edit: the stage name the script knows, and whether
/// the fields are the nested `fields` parameter (`tasks.task.add`, `crm.activity.add`) or the
/// parameters themselves (`register`, `finish`).
pub fn script_stage(method: &str) -> Option<(&'static str, bool)> {
    match method {
        "telephony.externalCall.register" => Some(("register", false)),
        "telephony.externalCall.finish" => Some(("finish", false)),
        "tasks.task.add" => Some(("task", true)),
        "crm.activity.add" => Some(("activity", true)),
        _ => None,
    }
}

/// The fields of `c` a script edits (see [`script_stage`]).
pub fn editable_fields(c: &Command, nested: bool) -> Value {
    if nested {
        c.params
            .get("fields")
            .cloned()
            .unwrap_or(Value::Object(Default::default()))
    } else {
        Value::Object(c.params.clone())
    }
}

/// Puts a script's edited fields back into `c`; anything but an object leaves plain
/// parameters as they were.
pub fn set_editable_fields(c: &mut Command, nested: bool, fields: Value) {
    match (nested, fields) {
        (true, f) => {
            c.params.insert("fields".into(), f);
        }
        (false, Value::Object(m)) => c.params = m,
        (false, _) => {}
    }
}
