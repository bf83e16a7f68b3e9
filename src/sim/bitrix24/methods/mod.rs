//! The simulated portal's data and REST methods (`bitrix24-api.md` §4–§7).
//!
//! Each handler validates like the real method (error codes and texts from the reference, the
//! empty-`error` CRM variants included), changes [`PortalData`], and returns the documented shape:
//! IDs as strings in list results, camelCase task objects, `[]` for empty lookups.

use chrono::{DateTime, Duration, FixedOffset, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{json, Map, Value};

use super::{get_ci, truthy, ApiError, ApiOk, ApiResult, Caller, PortalState};
use crate::sim::scenario::CrmKind;

mod crm;
mod params;
mod tasks;
mod telephony;
mod users;

use crm::*;
use params::*;
use tasks::*;
pub(super) use telephony::register_internal;
use telephony::*;
use users::*;

#[derive(Debug, Clone)]
pub struct PortalUser {
    pub id: u64,
    pub name: String,
    pub last_name: String,
    pub email: String,
    /// `UF_PHONE_INNER`.
    pub inner: Option<String>,
    pub active: bool,
}

#[derive(Debug, Clone)]
pub struct CrmEntity {
    pub kind: CrmKind,
    pub id: u64,
    pub title: String,
    pub phones: Vec<String>,
    pub assigned_by_id: u64,
    /// How the entity was created through the API (`None` for seeded ones).
    pub source: Option<String>,
}

/// A registered external call (`telephony.externalCall.register`).
#[derive(Debug, Clone)]
pub struct ExtCall {
    pub call_id: String,
    pub external_call_id: Option<String>,
    pub user_id: u64,
    pub phone: String,
    pub call_type: i64,
    pub line_number: Option<String>,
    pub start: DateTime<FixedOffset>,
    /// `CALL_START_DATE` exactly as sent (`None` when absent).
    pub start_raw: Option<String>,
    pub registered_at: DateTime<Utc>,
    pub finished: bool,
    pub crm_entity: Option<(CrmKind, u64)>,
    pub created_lead: Option<u64>,
    pub show: bool,
}

/// A telephony statistics row, created by `finish`.
#[derive(Debug, Clone)]
pub struct StatRow {
    pub id: u64,
    pub call_id: String,
    pub external_call_id: Option<String>,
    pub portal_user_id: u64,
    pub portal_number: String,
    pub phone: String,
    pub call_type: i64,
    pub duration: i64,
    pub start: DateTime<FixedOffset>,
    pub status_code: String,
    pub failed_reason: String,
    pub crm_entity: Option<(CrmKind, u64)>,
    pub crm_activity_id: Option<u64>,
    pub record_url: Option<String>,
    pub record_file_id: Option<u64>,
    /// How many times a record was attached (attachRecord replaces).
    pub record_attachments: u32,
    /// The bytes of a file uploaded with `FILE_CONTENT` (base64), if one was.
    pub record_content: Option<Vec<u8>>,
    pub add_to_chat: bool,
}

#[derive(Debug, Clone)]
pub struct Activity {
    pub id: u64,
    pub owner_type_id: i64,
    pub owner_id: u64,
    pub type_id: i64,
    pub subject: String,
    pub direction: i64,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub completed: bool,
    pub responsible_id: u64,
    pub description: String,
    pub originator_id: Option<String>,
    pub origin_id: Option<String>,
    pub provider_id: String,
    pub communications: Value,
    /// `UF_*` values written with it.
    pub user_fields: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub id: u64,
    pub title: String,
    pub description: String,
    pub responsible_id: u64,
    pub created_by: u64,
    pub deadline: Option<String>,
    pub uf_crm_task: Vec<String>,
    pub status: i64,
    pub xml_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// `UF_*` values written with it (`UF_CRM_TASK` excepted).
    pub user_fields: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct ExternalLine {
    pub number: String,
    pub name: String,
    pub crm_auto_create: String,
}

pub(crate) struct PortalData {
    pub tz: Tz,
    pub users: Vec<PortalUser>,
    pub entities: Vec<CrmEntity>,
    pub calls: Vec<ExtCall>,
    pub stats: Vec<StatRow>,
    pub activities: Vec<Activity>,
    pub tasks: Vec<Task>,
    pub lines: Vec<ExternalLine>,
    pub notifications: Vec<Value>,
    next_id: u64,
}

impl PortalData {
    pub fn new(tz: Tz) -> Self {
        Self {
            tz,
            users: Vec::new(),
            entities: Vec::new(),
            calls: Vec::new(),
            stats: Vec::new(),
            activities: Vec::new(),
            tasks: Vec::new(),
            lines: Vec::new(),
            notifications: Vec::new(),
            next_id: 10_000,
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn add_user(&mut self, u: PortalUser) {
        self.users.retain(|x| x.id != u.id);
        self.users.push(u);
        self.users.sort_by_key(|u| u.id);
    }

    pub fn add_entity(&mut self, e: CrmEntity) {
        self.next_id = self.next_id.max(e.id);
        self.entities.push(e);
    }

    fn active_user(&self, id: u64) -> Option<&PortalUser> {
        self.users.iter().find(|u| u.id == id && u.active)
    }

    /// Entities whose phone equals `phone` once both are reduced to digits (§5.3: "compared as a
    /// whole"; `+380...` and `380...` match, `050...` does not).
    fn by_phone(&self, phone: &str) -> Vec<&CrmEntity> {
        let want = digits(phone);
        if want.is_empty() {
            return Vec::new();
        }
        self.entities
            .iter()
            .filter(|e| e.phones.iter().any(|p| digits(p) == want))
            .collect()
    }

    fn local(&self, t: DateTime<Utc>) -> DateTime<FixedOffset> {
        t.with_timezone(&self.tz).fixed_offset()
    }

    fn fmt(&self, t: DateTime<FixedOffset>) -> String {
        t.with_timezone(&self.tz)
            .format("%Y-%m-%dT%H:%M:%S%:z")
            .to_string()
    }
}

pub(crate) fn dispatch(
    st: &mut PortalState,
    caller: &Caller,
    method: &str,
    p: &Map<String, Value>,
    now: DateTime<Utc>,
) -> ApiResult {
    let app_only = matches!(
        method,
        "telephony.externalcall.register"
            | "telephony.externalcall.finish"
            | "telephony.externalline.add"
            | "telephony.externalline.get"
            | "telephony.externalline.update"
    );
    if app_only && !caller.is_app() {
        return Err(err(
            403,
            "WRONG_AUTH_TYPE",
            "Current authorization type is denied for this method",
        ));
    }
    match method {
        "user.current" => user_current(st, caller),
        // DOC api-reference/common/system/app-info.md: ID, CODE, VERSION, STATUS, INSTALLED,
        // PAYMENT_EXPIRED, DAYS, LICENSE. A local application's CODE is its client_id; real
        // portals also answer CLIENT_ID and member_id for applications (undocumented), so the
        // simulator sends both and ubsync accepts either.
        "app.info" => match caller {
            Caller::App { .. } => Ok(ApiOk::new(serde_json::json!({
                "ID": "7", "CODE": st.cfg.client_id, "CLIENT_ID": st.cfg.client_id, "VERSION": 1,
                "STATUS": "L", "INSTALLED": true, "PAYMENT_EXPIRED": "N", "DAYS": null,
                "LICENSE": "ua_project", "member_id": st.member_id,
            }))),
            Caller::Webhook { .. } => Err(err(
                401,
                "WRONG_AUTH_TYPE",
                "Current authorization type is denied for this method",
            )),
        },
        "user.get" => user_get(st, p),
        "telephony.externalcall.register" => register(st, caller, p, now),
        "telephony.externalcall.finish" => finish(st, p),
        "telephony.externalcall.attachrecord" => attach_record(st, p),
        "telephony.externalcall.searchcrmentities" => search_crm(st, p),
        "telephony.externalcall.show" | "telephony.externalcall.hide" => {
            let id = s(p, "CALL_ID").unwrap_or_default();
            Ok(ApiOk::new(json!(st.data.calls.iter().any(|c| c.call_id == id))))
        }
        "telephony.externalline.get" => Ok(ApiOk::new(Value::Array(
            st.data.lines.iter().map(|l| json!({"NUMBER": l.number, "NAME": l.name, "CRM_AUTO_CREATE": l.crm_auto_create})).collect(),
        ))),
        "telephony.externalline.add" => line_add(st, p),
        "voximplant.statistic.get" => statistic_get(st, p),
        "crm.duplicate.findbycomm" => findbycomm(st, p),
        "crm.lead.add" => lead_add(st, caller, p),
        "crm.lead.list" => entity_list(st, p, CrmKind::Lead),
        "crm.contact.list" => entity_list(st, p, CrmKind::Contact),
        "crm.company.list" => entity_list(st, p, CrmKind::Company),
        "crm.activity.update" => activity_update(st, p),
        "crm.activity.add" => activity_add(st, caller, p),
        "crm.activity.list" => activity_list(st, p),
        "tasks.task.add" => task_add(st, caller, p, now),
        "event.bind" => super::events::bind(st, p),
        "event.get" => super::events::get(st),
        "event.unbind" => super::events::unbind(st, p),
        "event.offline.get" => super::events::offline_get(st, p),
        "event.offline.clear" => super::events::offline_clear(st, p),
        "feature.get" => super::events::feature_get(st, p),
        "tasks.task.getfields" => Ok(ApiOk::new(super::fields::task_fields())),
        "crm.activity.fields" => Ok(ApiOk::new(super::fields::crm_fields(false))),
        "crm.lead.fields" => Ok(ApiOk::new(super::fields::crm_fields(true))),
        "tasks.task.list" => task_list(st, p),
        "tasks.task.get" => {
            let id = int(p, "taskId").unwrap_or(0) as u64;
            match st.data.tasks.iter().find(|t| t.id == id) {
                Some(t) => Ok(ApiOk::new(json!({"task": task_json(st, t)}))),
                None => Err(err(400, "ERROR_CORE", "Task not found or not accessible")),
            }
        }
        "tasks.task.update" => task_update(st, p),
        "tasks.task.complete" => task_set_status(st, p, 5),
        "im.notify" | "im.notify.system.add" | "im.notify.personal.add" => {
            if method != "im.notify" {
                if int(p, "USER_ID").unwrap_or(0) <= 0 {
                    return Err(err(400, "USER_ID_EMPTY", "User ID can't be empty"));
                }
                if s(p, "MESSAGE").is_none_or(|m| m.trim().is_empty()) {
                    return Err(err(400, "MESSAGE_EMPTY", "Message can't be empty"));
                }
            }
            // A notification with the tag of an earlier one replaces it.
            if let Some(tag) = s(p, "TAG") {
                st.data
                    .notifications
                    .retain(|n| n.get("TAG").and_then(Value::as_str) != Some(tag.as_str()));
            }
            let id = st.data.id();
            st.data.notifications.push(Value::Object(p.clone()));
            Ok(ApiOk::new(json!(id)))
        }
        _ => Err(err(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")),
    }
}
