//! `telephony.externalCall.register` / `finish` / `attachRecord` and `voximplant.statistic.get`
//! (`bitrix24-api.md` §4): builders and one decoder for what they say about a call.

use serde_json::{json, Value};

use super::crm::Entity;
use crate::bitrix24::batch::{result_ref, Command};
use crate::bitrix24::wire::{as_i64, as_text};

/// A call's `CALL_ID` parameter: known, or what a `register` earlier in the same batch answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallRef {
    Known(String),
    /// The batch key of the `register` whose `CALL_ID` this is.
    RegisteredBy(String),
}

impl CallRef {
    fn value(&self) -> Value {
        match self {
            CallRef::Known(id) => json!(id),
            CallRef::RegisteredBy(key) => json!(result_ref(key, "CALL_ID")),
        }
    }
}

/// `telephony.externalCall.register` (§4.1).
#[derive(Debug, Clone)]
pub struct Register<'a> {
    pub user_id: i64,
    /// The client's number (E.164).
    pub phone: &'a str,
    pub incoming: bool,
    /// RFC 3339 with the portal's offset.
    pub start: &'a str,
    /// `unitalk-<id>`: unique per physical call.
    pub external_id: &'a str,
    pub line_number: Option<&'a str>,
    /// Let Bitrix24 create a lead for an unknown number.
    pub crm_create: bool,
    /// The CRM entity the call belongs to (`rules.crm_order`); `None` lets Bitrix24 choose.
    pub crm_entity: Option<&'a super::crm::Entity>,
}

impl Register<'_> {
    pub fn command(&self, key: impl Into<String>) -> Command {
        let mut p = json!({
            "USER_ID": self.user_id, "PHONE_NUMBER": self.phone,
            "TYPE": if self.incoming { 2 } else { 1 },
            "CALL_START_DATE": self.start,
            "EXTERNAL_CALL_ID": self.external_id, "SHOW": 0,
            "CRM_CREATE": i32::from(self.crm_create),
        });
        if let Some(line) = self.line_number {
            p["LINE_NUMBER"] = json!(line);
        }
        if let Some(e) = self.crm_entity {
            p["CRM_ENTITY_TYPE"] = json!(e.kind);
            p["CRM_ENTITY_ID"] = json!(e.id);
        }
        Command::new(key, "telephony.externalCall.register", p)
    }
}

/// `telephony.externalCall.register` of a CRM callback request (`TYPE=4`, shown to the user
/// who takes it, bound to the request's CRM entity).
#[derive(Debug, Clone)]
pub struct RegisterCallback<'a> {
    pub user_id: i64,
    pub phone: &'a str,
    pub start: &'a str,
    pub external_id: &'a str,
    pub line_number: Option<&'a str>,
    pub entity: Option<(&'a str, i64)>,
}

impl RegisterCallback<'_> {
    pub fn command(&self, key: impl Into<String>) -> Command {
        let mut p = json!({
            "USER_ID": self.user_id, "PHONE_NUMBER": self.phone, "TYPE": 4, "SHOW": 1,
            "EXTERNAL_CALL_ID": self.external_id, "CRM_CREATE": 0,
            "CALL_START_DATE": self.start,
        });
        if let Some((kind, id)) = self.entity {
            p["CRM_ENTITY_TYPE"] = json!(kind);
            p["CRM_ENTITY_ID"] = json!(id);
        }
        if let Some(line) = self.line_number {
            p["LINE_NUMBER"] = json!(line);
        }
        Command::new(key, "telephony.externalCall.register", p)
    }
}

/// `telephony.externalCall.finish` (§4.2). `ADD_TO_CHAT` is always sent: its default changed
/// between versions of the docs.
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    pub call: CallRef,
    pub user_id: i64,
    pub duration: u32,
    pub status_code: &'a str,
    pub add_to_chat: bool,
    /// The deprecated `RECORD_URL`: Bitrix24 downloads it, with no error when that fails.
    pub record_url: Option<&'a str>,
}

impl Finish<'_> {
    pub fn command(&self, key: impl Into<String>) -> Command {
        let mut p = json!({
            "CALL_ID": self.call.value(), "USER_ID": self.user_id, "DURATION": self.duration,
            "STATUS_CODE": self.status_code, "ADD_TO_CHAT": i32::from(self.add_to_chat),
        });
        if let Some(url) = self.record_url {
            p["RECORD_URL"] = json!(url);
        }
        Command::new(key, "telephony.externalCall.finish", p)
    }
}

/// `telephony.externalCall.attachRecord` with a link Bitrix24 downloads (§4.3).
pub fn attach_record_url(
    key: impl Into<String>,
    call: &CallRef,
    url: &str,
    filename: &str,
) -> Command {
    Command::new(
        key,
        "telephony.externalCall.attachRecord",
        json!({"CALL_ID": call.value(), "RECORD_URL": url, "FILENAME": filename}),
    )
}

/// `telephony.externalCall.attachRecord` with the file itself (base64 `FILE_CONTENT`).
pub fn attach_record_file(
    key: impl Into<String>,
    call: &CallRef,
    filename: &str,
    content_base64: String,
) -> Command {
    Command::new(
        key,
        "telephony.externalCall.attachRecord",
        json!({"CALL_ID": call.value(), "FILENAME": filename, "FILE_CONTENT": content_base64}),
    )
}

/// An `attachRecord` without its file content (what a log or the quarantine may keep).
pub fn without_file(c: &Command) -> Command {
    let mut c = c.clone();
    c.params.remove("FILE_CONTENT");
    c
}

/// The statistics row of one call, by `EXTERNAL_CALL_ID`.
pub fn statistic_of(key: impl Into<String>, external_id: &str) -> Command {
    Command::new(
        key,
        "voximplant.statistic.get",
        json!({"FILTER": {"EXTERNAL_CALL_ID": external_id}}),
    )
}

/// The parameters of one page of the statistics for calls started in `[from, to)` (RFC 3339
/// with the portal's offset), in a stable order.
pub fn statistics_by_start(from: &str, to: &str, start: u64) -> Value {
    json!({"FILTER": {">=CALL_START_DATE": from, "<CALL_START_DATE": to}, "SORT": "ID", "ORDER": "ASC", "start": start})
}

/// The field of a statistics row that carries ubsync's call key.
pub const STATISTICS_KEY_FIELD: &str = "EXTERNAL_CALL_ID";

/// What `register`, `finish` and a statistics row say about a call; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallRecord {
    pub call_id: Option<String>,
    pub external_call_id: Option<String>,
    /// The statistics row's `ID` (`finish` answers it too).
    pub stat_id: Option<i64>,
    pub activity_id: Option<i64>,
    pub entity: Option<Entity>,
    /// A recording file is attached (`RECORD_FILE_ID`): the only proof of a recording.
    pub record_file: bool,
    /// A recording URL is known (`CALL_RECORD_URL`), which `finish`'s `RECORD_URL` sets even when
    /// nothing was downloaded.
    pub record_url: bool,
}

impl CallRecord {
    pub fn decode(v: &Value) -> Self {
        let text = |k: &str| v.get(k).and_then(as_text).filter(|t| !t.is_empty());
        let entity = match (
            text("CRM_ENTITY_TYPE"),
            v.get("CRM_ENTITY_ID").and_then(as_i64),
        ) {
            (Some(kind), Some(id)) => Some(Entity { kind, id }),
            _ => None,
        };
        Self {
            call_id: text("CALL_ID"),
            external_call_id: text("EXTERNAL_CALL_ID"),
            stat_id: v.get("ID").and_then(as_i64),
            activity_id: v.get("CRM_ACTIVITY_ID").and_then(as_i64),
            entity,
            record_file: text("RECORD_FILE_ID").is_some_and(|id| id != "0"),
            record_url: text("CALL_RECORD_URL").is_some(),
        }
    }

    /// Decodes a list answer (`voximplant.statistic.get`); anything but an array is no rows.
    pub fn decode_all(v: &Value) -> Vec<Self> {
        v.as_array()
            .map(|a| a.iter().map(Self::decode).collect())
            .unwrap_or_default()
    }
}

/// Whether an `attachRecord` answer proves the recording is attached: only a `FILE_ID` does; an
/// `uploadUrl` answer means the file is still to be uploaded.
pub fn attached(result: &Value) -> Result<(), String> {
    if result.get("FILE_ID").and_then(as_i64).is_some() {
        return Ok(());
    }
    if result.get("uploadUrl").is_some() {
        return Err("telephony.externalCall.attachRecord answered an uploadUrl, not a FILE_ID: the recording is not attached yet".into());
    }
    Err(format!(
        "telephony.externalCall.attachRecord answered without a FILE_ID: {}",
        crate::redact::field(&result.to_string())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finish_that_follows_its_register_in_the_batch_refers_to_its_answer() {
        let c = Finish {
            call: CallRef::RegisteredBy("r_7".into()),
            user_id: 5,
            duration: 30,
            status_code: "200",
            add_to_chat: false,
            record_url: Some("https://rec/7.mp3"),
        }
        .command("f_7");
        assert_eq!(c.method, "telephony.externalCall.finish");
        assert_eq!(c.params["CALL_ID"], json!("$result[r_7][CALL_ID]"));
        assert_eq!(c.params["ADD_TO_CHAT"], json!(0));
        assert_eq!(c.params["RECORD_URL"], json!("https://rec/7.mp3"));
        let c = Register {
            user_id: 5,
            phone: "+380501112233",
            incoming: true,
            start: "2026-11-22T14:00:00+02:00",
            external_id: "unitalk-7",
            line_number: None,
            crm_create: true,
            crm_entity: None,
        }
        .command("r_7");
        assert_eq!(c.params["TYPE"], json!(2));
        assert_eq!(c.params["CRM_CREATE"], json!(1));
        assert!(!c.params.contains_key("LINE_NUMBER"));
        assert!(
            !c.params.contains_key("CRM_ENTITY_TYPE"),
            "Bitrix24 chooses"
        );
        let lead = super::super::crm::Entity {
            kind: "LEAD".into(),
            id: 18,
        };
        let c = Register {
            user_id: 5,
            phone: "+380501112233",
            incoming: true,
            start: "2026-11-22T14:00:00+02:00",
            external_id: "unitalk-7",
            line_number: None,
            crm_create: true,
            crm_entity: Some(&lead),
        }
        .command("r_7");
        assert_eq!(
            (&c.params["CRM_ENTITY_TYPE"], &c.params["CRM_ENTITY_ID"]),
            (&json!("LEAD"), &json!(18))
        );
    }

    #[test]
    fn call_records_decode_strings_numbers_and_empties() {
        let r = CallRecord::decode(&json!({
            "ID": "5", "CALL_ID": "externalCall.1", "EXTERNAL_CALL_ID": "unitalk-7",
            "CRM_ACTIVITY_ID": 9, "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": "797",
            "CALL_RECORD_URL": "https://rec/7.mp3", "RECORD_FILE_ID": null,
        }));
        assert_eq!(r.stat_id, Some(5));
        assert_eq!(r.activity_id, Some(9));
        assert_eq!(
            r.entity,
            Some(Entity {
                kind: "CONTACT".into(),
                id: 797
            })
        );
        assert!(r.record_url && !r.record_file, "a URL is not a file");
        let r = CallRecord::decode(
            &json!({"CRM_ENTITY_TYPE": "", "CRM_ENTITY_ID": null, "RECORD_FILE_ID": "0", "CALL_RECORD_URL": ""}),
        );
        assert_eq!(r, CallRecord::default());
        assert!(CallRecord::decode(&json!({"RECORD_FILE_ID": 9079})).record_file);
        assert!(CallRecord::decode_all(&json!({})).is_empty());
    }

    #[test]
    fn only_a_file_id_proves_an_attached_recording() {
        assert!(attached(&json!({"FILE_ID": 9079})).is_ok());
        assert!(attached(&json!({"FILE_ID": "9079"})).is_ok());
        let e =
            attached(&json!({"uploadUrl": "https://p/upload", "fieldName": "file"})).unwrap_err();
        assert!(e.contains("uploadUrl"), "{e}");
        assert!(attached(&json!(true)).is_err());
        assert!(attached(&json!({})).is_err());
    }
}
