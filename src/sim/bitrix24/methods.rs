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

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

fn err(status: u16, code: &str, description: &str) -> ApiError {
    ApiError::new(status, code, description)
}

fn core(description: &str) -> ApiError {
    err(400, "ERROR_CORE", description)
}

fn s(params: &Map<String, Value>, key: &str) -> Option<String> {
    match get_ci(params, key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "1" } else { "0" }.into()),
        _ => None,
    }
}

fn int(params: &Map<String, Value>, key: &str) -> Option<i64> {
    match get_ci(params, key)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn obj<'a>(params: &'a Map<String, Value>, key: &str) -> Option<&'a Map<String, Value>> {
    get_ci(params, key)?.as_object()
}

fn list_of_strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .or_else(|| x.as_i64().map(|n| n.to_string()))
            })
            .collect(),
        Some(Value::Object(m)) => m
            .values()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// A phone number a portal accepts: optional `+`, digits with common separators, 3–20 digits.
fn phone_ok(p: &str) -> bool {
    let stripped: String = p
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'))
        .collect();
    let body = stripped.strip_prefix('+').unwrap_or(&stripped);
    !body.is_empty() && body.chars().all(|c| c.is_ascii_digit()) && (3..=20).contains(&body.len())
}

/// ISO 8601 as PHP's DateTime reads it: with an offset, or without (then in the portal's zone).
fn parse_iso(raw: &str, tz: Tz) -> Option<DateTime<FixedOffset>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t);
    }
    if let Ok(t) = DateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%z") {
        return Some(t);
    }
    let naive = NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S"))
        .ok()?;
    tz.from_local_datetime(&naive)
        .earliest()
        .map(|t| t.fixed_offset())
}

fn page(params: &Map<String, Value>) -> usize {
    int(params, "start").filter(|s| *s > 0).unwrap_or(0) as usize
}

/// Slices `items` to one page of 50 and fills `total`/`next` like a list method.
fn paged(items: Vec<Value>, start: usize) -> ApiOk {
    let total = items.len();
    let rows: Vec<Value> = items.into_iter().skip(start).take(50).collect();
    let next = (start + 50 < total).then_some((start + 50) as u64);
    ApiOk {
        result: Value::Array(rows),
        total: Some(total as u64),
        next,
    }
}

/// A list filter key with its operator prefix split off (`>=CALL_START_DATE` → (">=", ...)).
fn split_op(key: &str) -> (&str, &str) {
    for op in [">=", "<=", "!=", "!@", "@", ">", "<", "=", "!", "%"] {
        if let Some(rest) = key.strip_prefix(op) {
            return (op, rest);
        }
    }
    ("", key)
}

fn cmp_matches(op: &str, ord: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        ">=" => ord != Less,
        "<=" => ord != Greater,
        ">" => ord == Greater,
        "<" => ord == Less,
        "!" | "!=" => ord != Equal,
        _ => ord == Equal,
    }
}

/// Compares a field value with a filter value: instants if both parse as dates, numbers if both
/// are numeric, text otherwise; `@` takes a list.
fn filter_matches(op: &str, field: &Value, want: &Value, tz: Tz) -> bool {
    if op == "@" || op == "!@" {
        let set = list_of_strings(Some(want));
        let hit = set.iter().any(|w| value_text(field) == *w);
        return if op == "@" { hit } else { !hit };
    }
    if op == "%" {
        return value_text(field)
            .to_lowercase()
            .contains(&value_text(want).to_lowercase());
    }
    let (f, w) = (value_text(field), value_text(want));
    if let (Some(a), Some(b)) = (parse_iso(&f, tz), parse_iso(&w, tz)) {
        return cmp_matches(op, a.cmp(&b));
    }
    if let (Ok(a), Ok(b)) = (f.parse::<f64>(), w.parse::<f64>()) {
        return cmp_matches(op, a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal));
    }
    cmp_matches(op, f.cmp(&w))
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => if *b { "Y" } else { "N" }.into(),
        other => other.to_string(),
    }
}

/// Applies a Bitrix24 list filter to JSON rows (field names upper-case).
fn apply_filter(rows: Vec<Value>, filter: Option<&Map<String, Value>>, tz: Tz) -> Vec<Value> {
    let Some(filter) = filter else { return rows };
    rows.into_iter()
        .filter(|row| {
            filter.iter().all(|(k, want)| {
                let (op, field) = split_op(k);
                let Some(have) = row.as_object().and_then(|o| get_ci(o, field)) else {
                    return false;
                };
                filter_matches(op, have, want, tz)
            })
        })
        .collect()
}

fn select(rows: Vec<Value>, params: &Map<String, Value>) -> Vec<Value> {
    let fields = list_of_strings(get_ci(params, "select"));
    if fields.is_empty() || fields.iter().any(|f| f == "*") {
        return rows;
    }
    rows.into_iter()
        .map(|r| {
            let mut out = Map::new();
            if let Value::Object(m) = r {
                for f in &fields {
                    if let Some((k, v)) = m.iter().find(|(k, _)| k.eq_ignore_ascii_case(f)) {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Object(out)
        })
        .collect()
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

fn user_json(u: &PortalUser) -> Value {
    json!({
        "ID": u.id.to_string(), "ACTIVE": u.active, "NAME": u.name, "LAST_NAME": u.last_name,
        "EMAIL": u.email, "UF_PHONE_INNER": u.inner, "IS_ONLINE": "Y", "UF_DEPARTMENT": [1],
        "TIME_ZONE": "", "USER_TYPE": "employee",
    })
}

fn user_current(st: &PortalState, caller: &Caller) -> ApiResult {
    st.data
        .users
        .iter()
        .find(|u| u.id == caller.user_id())
        .map(|u| ApiOk::new(user_json(u)))
        .ok_or_else(|| err(401, "NO_AUTH_FOUND", "Wrong authorization data"))
}

fn user_get(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    // §7: filter keys may come under FILTER/filter or at the top level.
    let mut filter = obj(p, "filter").cloned().unwrap_or_default();
    for (k, v) in p {
        let (_, field) = split_op(k);
        let upper = field.to_uppercase();
        if !matches!(
            upper.as_str(),
            "FILTER" | "SORT" | "ORDER" | "SELECT" | "START" | "ADMIN_MODE"
        ) {
            filter.insert(k.clone(), v.clone());
        }
    }
    let rows: Vec<Value> = st.data.users.iter().map(user_json).collect();
    let rows: Vec<Value> = rows
        .into_iter()
        .filter(|row| {
            filter.iter().all(|(k, want)| {
                let (op, field) = split_op(k);
                let have = row
                    .as_object()
                    .and_then(|o| get_ci(o, field))
                    .cloned()
                    .unwrap_or(Value::Null);
                if field.eq_ignore_ascii_case("ACTIVE") {
                    let want_active = truthy(want) || value_text(want).eq_ignore_ascii_case("y");
                    return have.as_bool() == Some(want_active);
                }
                filter_matches(op, &have, want, st.data.tz)
            })
        })
        .collect();
    let rows = select(rows, p);
    Ok(paged(rows, page(p)))
}

fn resolve_user(st: &PortalState, p: &Map<String, Value>) -> Result<u64, ApiError> {
    let user = if let Some(id) = int(p, "USER_ID") {
        st.data.active_user(id as u64)
    } else if let Some(inner) = s(p, "USER_PHONE_INNER") {
        st.data
            .users
            .iter()
            .find(|u| u.active && u.inner.as_deref() == Some(inner.as_str()))
    } else {
        return Err(core("USER_ID or USER_PHONE_INNER should be set"));
    };
    user.map(|u| u.id)
        .ok_or_else(|| core("User is not found or is not active"))
}

/// What the portal does itself when a user clicks a number: a registration without
/// `EXTERNAL_CALL_ID`. Returns its `CALL_ID`.
pub(super) fn register_internal(
    st: &mut PortalState,
    p: &Map<String, Value>,
    now: DateTime<Utc>,
) -> String {
    register(st, &Caller::App { user_id: 1 }, p, now)
        .ok()
        .and_then(|ok| {
            ok.result
                .get("CALL_ID")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_default()
}

fn register(
    st: &mut PortalState,
    _caller: &Caller,
    p: &Map<String, Value>,
    now: DateTime<Utc>,
) -> ApiResult {
    let user_id = resolve_user(st, p)?;
    let call_type = int(p, "TYPE").unwrap_or(0);
    if !(1..=5).contains(&call_type) {
        return Err(core("Unknown TYPE"));
    }
    let phone = s(p, "PHONE_NUMBER").unwrap_or_default();
    if !phone_ok(&phone) {
        return Err(core("Unsupported phone number format"));
    }
    let start_raw = s(p, "CALL_START_DATE");
    let start = match &start_raw {
        Some(raw) => parse_iso(raw, st.data.tz)
            .ok_or_else(|| core("CALL_START_DATE should be in the ISO-8601 format"))?,
        None => st.data.local(now),
    };
    let line = s(p, "LINE_NUMBER");
    let external = s(p, "EXTERNAL_CALL_ID");

    // §4.1: a repeat within 30 minutes with the same key returns the same unfinished call.
    if let Some(prev) = st.data.calls.iter().find(|c| {
        !c.finished
            && now - c.registered_at < Duration::minutes(30)
            && c.phone == phone
            && c.call_type == call_type
            && c.user_id == user_id
            && (line.is_none() || c.line_number == line)
            && (external.is_none() || c.external_call_id == external)
    }) {
        return Ok(ApiOk::new(register_result(prev)));
    }

    let mut crm_entity = match (s(p, "CRM_ENTITY_TYPE"), int(p, "CRM_ENTITY_ID")) {
        (Some(t), Some(id)) => kind_from(&t).map(|k| (k, id as u64)),
        _ => None,
    };
    if crm_entity.is_none() {
        let found = st.data.by_phone(&phone);
        let best = [CrmKind::Contact, CrmKind::Company, CrmKind::Lead]
            .iter()
            .find_map(|k| found.iter().find(|e| e.kind == *k).map(|e| (e.kind, e.id)));
        crm_entity = best;
    }
    let mut created_lead = None;
    if crm_entity.is_none() && int(p, "CRM_CREATE").unwrap_or(0) == 1 && st.cfg.lead_creation {
        let id = st.data.id();
        st.data.entities.push(CrmEntity {
            kind: CrmKind::Lead,
            id,
            title: format!(
                "{phone} - {}",
                if call_type == 1 {
                    "Outgoing call"
                } else {
                    "Incoming call"
                }
            ),
            phones: vec![phone.clone()],
            assigned_by_id: user_id,
            source: Some("telephony".into()),
        });
        created_lead = Some(id);
        crm_entity = Some((CrmKind::Lead, id));
    }
    let call = ExtCall {
        call_id: format!(
            "externalCall.{:032x}.{}",
            rand::random::<u128>(),
            now.timestamp()
        ),
        external_call_id: external,
        user_id,
        phone,
        call_type,
        line_number: line,
        start,
        start_raw,
        registered_at: now,
        finished: false,
        crm_entity,
        created_lead,
        show: int(p, "SHOW").unwrap_or(1) == 1,
    };
    let result = register_result(&call);
    st.data.calls.push(call);
    Ok(ApiOk::new(result))
}

fn kind_from(t: &str) -> Option<CrmKind> {
    match t.to_uppercase().as_str() {
        "CONTACT" => Some(CrmKind::Contact),
        "LEAD" => Some(CrmKind::Lead),
        "COMPANY" => Some(CrmKind::Company),
        _ => None,
    }
}

fn register_result(c: &ExtCall) -> Value {
    let mut v = json!({
        "CALL_ID": c.call_id,
        "CRM_CREATED_LEAD": c.created_lead,
        "CRM_CREATED_ENTITIES": c.created_lead.map(|id| json!([{"ENTITY_TYPE": "LEAD", "ENTITY_ID": id}])).unwrap_or(json!([])),
        "CRM_ENTITY_TYPE": c.crm_entity.map(|(k, _)| k.as_str()).unwrap_or(""),
        "CRM_ENTITY_ID": c.crm_entity.map(|(_, id)| id),
    });
    if c.crm_entity.is_none() {
        v["LEAD_CREATION_ERROR"] = json!("Lead creation is disabled for local users");
    }
    v
}

const STATUS_CODES: &[&str] = &[
    "200", "304", "603", "603-S", "403", "404", "486", "484", "503", "480", "402", "423", "OTHER",
];

fn finish(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let call_id = match get_ci(p, "CALL_ID") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(err(400, "INVALID_ARGUMENT", "CALL_ID must be a string")),
    };
    let user_id = resolve_user(st, p)?;
    let Some(idx) = st
        .data
        .calls
        .iter()
        .position(|c| c.call_id == call_id && !c.finished)
    else {
        // §4.2: unknown and already-finished calls get the same answer, so finish is not idempotent.
        return Err(core(
            "Call is not found (call should be registered prior to finishing",
        ));
    };
    let duration = int(p, "DURATION").unwrap_or(0).max(0);
    let status = s(p, "STATUS_CODE").unwrap_or_else(|| {
        if duration > 0 {
            "200".into()
        } else {
            "304".into()
        }
    });
    let status = if STATUS_CODES.contains(&status.as_str()) {
        status
    } else {
        "OTHER".into()
    };
    let add_to_chat = int(p, "ADD_TO_CHAT").unwrap_or(1) == 1;
    st.data.calls[idx].finished = true;
    let call = st.data.calls[idx].clone();
    let stat_id = st.data.stats.len() as u64 + 1;

    // Only finish creates the CRM call activity (§4), bound to the call's entity.
    let activity_id = call.crm_entity.map(|(kind, owner)| {
        let id = st.data.id();
        let incoming = call.call_type != 1;
        let end = call.start + Duration::seconds(duration);
        st.data.activities.push(Activity {
            id,
            owner_type_id: match kind {
                CrmKind::Lead => 1,
                CrmKind::Contact => 3,
                CrmKind::Company => 4,
            },
            owner_id: owner,
            type_id: 2,
            subject: if incoming { "Incoming call" } else { "Outgoing call" }.into(),
            direction: if incoming { 1 } else { 2 },
            start_time: Some(st.data.fmt(call.start)),
            end_time: Some(st.data.fmt(end)),
            completed: true,
            responsible_id: user_id,
            description: String::new(),
            originator_id: None,
            origin_id: Some(format!("VI_{}", call.call_id)),
            provider_id: "VOXIMPLANT_CALL".into(),
            communications: json!([{"VALUE": call.phone, "ENTITY_ID": owner, "ENTITY_TYPE_ID": 0, "TYPE": "PHONE"}]),
            user_fields: Default::default(),
        });
        id
    });
    let mut row = StatRow {
        id: stat_id,
        call_id: call.call_id.clone(),
        external_call_id: call.external_call_id.clone(),
        portal_user_id: user_id,
        portal_number: call
            .line_number
            .clone()
            .unwrap_or_else(|| "REST_APP:3".into()),
        phone: call.phone.clone(),
        call_type: call.call_type,
        duration,
        start: call.start,
        status_code: status.clone(),
        failed_reason: s(p, "FAILED_REASON").unwrap_or_default(),
        crm_entity: call.crm_entity,
        crm_activity_id: activity_id,
        record_url: s(p, "RECORD_URL"),
        record_file_id: None,
        record_attachments: 0,
        record_content: None,
        add_to_chat,
    };
    if add_to_chat {
        st.data.notifications.push(
            json!({"USER_ID": user_id, "MESSAGE": format!("Call {} {}", call.phone, status)}),
        );
    }
    if row.record_url.is_some() && st.cfg.finish_record_downloads {
        row.record_file_id = Some(st.data.id());
        row.record_attachments = 1;
    }
    st.data.stats.push(row);
    Ok(ApiOk::new(json!({
        "CALL_ID": call.call_id,
        "EXTERNAL_CALL_ID": call.external_call_id,
        "PORTAL_USER_ID": user_id,
        "PHONE_NUMBER": call.phone,
        "PORTAL_NUMBER": call.line_number.unwrap_or_else(|| "REST_APP:3".into()),
        "INCOMING": call.call_type.to_string(),
        "CALL_DURATION": duration,
        "CALL_START_DATE": {},
        "CALL_STATUS": if status == "200" { 1 } else { 0 },
        "CALL_VOTE": int(p, "VOTE"),
        "COST": 0,
        "COST_CURRENCY": "",
        "CALL_FAILED_CODE": status,
        "CALL_FAILED_REASON": "",
        "REST_APP_ID": "3",
        "REST_APP_NAME": "ubsync",
        "CRM_ACTIVITY_ID": activity_id,
        "COMMENT": null,
        "CRM_ENTITY_TYPE": call.crm_entity.map(|(k, _)| k.as_str()).unwrap_or(""),
        "CRM_ENTITY_ID": call.crm_entity.map(|(_, id)| id),
        "ID": stat_id,
    })))
}

fn attach_record(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let call_id = s(p, "CALL_ID").unwrap_or_default();
    let url = s(p, "RECORD_URL");
    let filename = s(p, "FILENAME");
    let content = s(p, "FILE_CONTENT");
    let Some(idx) = st.data.stats.iter().position(|r| r.call_id == call_id) else {
        return Err(core(
            "Call is not found in the statistic table. Looks like it is not finished yet.",
        ));
    };
    if url.is_none() && filename.is_none() {
        return Err(core(
            "Required parameters are not set. Request should contain or URL or FILENAME parameter",
        ));
    }
    let name = filename.clone().or_else(|| {
        url.as_deref()
            .and_then(|u| u.rsplit('/').next().map(str::to_string))
    });
    if let Some(f) = &filename {
        let ext = f.rsplit('.').next().unwrap_or("").to_lowercase();
        if f.trim().is_empty() {
            return Err(core("File name is empty"));
        }
        if ext != "mp3" && ext != "wav" {
            return Err(core("Wrong file extension. Only wav and mp3 are allowed"));
        }
    }
    if filename.is_some() && url.is_none() && content.is_none() {
        return Ok(ApiOk::new(
            json!({"uploadUrl": format!("{}/rest/upload.json?token=telephony%7C{}", st.base_url, st.data.stats[idx].id), "fieldName": "file"}),
        ));
    }
    let _ = name;
    let bytes = match &content {
        Some(c) => {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(c.trim()) {
                Ok(b) if !b.is_empty() => Some(b),
                _ => return Err(core("File content is empty or not base64")),
            }
        }
        None => None,
    };
    let file_id = st.data.id();
    let row = &mut st.data.stats[idx];
    row.record_url = url.or(Some(format!("content:{}", filename.unwrap_or_default())));
    row.record_file_id = Some(file_id);
    row.record_attachments += 1;
    row.record_content = bytes;
    Ok(ApiOk::new(json!({"FILE_ID": file_id})))
}

fn search_crm(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let phone = s(p, "PHONE_NUMBER").unwrap_or_default();
    if phone.is_empty() {
        return Err(core("PHONE_NUMBER is empty"));
    }
    let found: Vec<Value> = st
        .data
        .by_phone(&phone)
        .into_iter()
        .map(|e| {
            json!({
                "CRM_ENTITY_TYPE": e.kind.as_str(), "CRM_ENTITY_ID": e.id, "ASSIGNED_BY_ID": e.assigned_by_id,
                "NAME": e.title,
                "ASSIGNED_BY": {"ID": e.assigned_by_id.to_string(), "TIMEMAN_STATUS": "OPENED", "USER_PHONE_INNER":
                    st.data.users.iter().find(|u| u.id == e.assigned_by_id).and_then(|u| u.inner.clone()),
                    "WORK_PHONE": null, "PERSONAL_PHONE": null, "PERSONAL_MOBILE": null},
            })
        })
        .collect();
    Ok(ApiOk::new(Value::Array(found)))
}

fn line_add(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let number = s(p, "NUMBER").unwrap_or_default();
    if number.is_empty() {
        return Err(core("NUMBER should not be empty"));
    }
    if st.data.lines.iter().any(|l| l.number == number) {
        return Err(core("Line already exists"));
    }
    let id = st.data.lines.len() as u64 + 1;
    st.data.lines.push(ExternalLine {
        number: number.clone(),
        name: s(p, "NAME").unwrap_or_else(|| number.clone()),
        crm_auto_create: s(p, "CRM_AUTO_CREATE").unwrap_or_else(|| "Y".into()),
    });
    Ok(ApiOk::new(json!({"ID": id})))
}

fn stat_json(st: &PortalState, r: &StatRow) -> Value {
    json!({
        "ID": r.id.to_string(), "CALL_ID": r.call_id, "EXTERNAL_CALL_ID": r.external_call_id,
        "PORTAL_USER_ID": r.portal_user_id.to_string(), "PORTAL_NUMBER": r.portal_number,
        "PHONE_NUMBER": r.phone, "CALL_TYPE": r.call_type.to_string(), "CALL_CATEGORY": "external",
        "CALL_DURATION": r.duration.to_string(), "CALL_START_DATE": st.data.fmt(r.start),
        "CALL_FAILED_CODE": r.status_code, "CALL_FAILED_REASON": r.failed_reason,
        "CALL_RECORD_URL": r.record_url.clone().unwrap_or_default(),
        "RECORD_FILE_ID": r.record_file_id.map(|id| id.to_string()),
        "CALL_VOTE": "0", "COST": "0.0000", "COST_CURRENCY": "",
        "CRM_ENTITY_TYPE": r.crm_entity.map(|(k, _)| k.as_str()), "CRM_ENTITY_ID": r.crm_entity.map(|(_, id)| id.to_string()),
        "CRM_ACTIVITY_ID": r.crm_activity_id.map(|id| id.to_string()),
        "REST_APP_ID": "3", "REST_APP_NAME": "ubsync", "TRANSCRIPT_ID": null, "TRANSCRIPT_PENDING": "N",
        "SESSION_ID": null, "REDIAL_ATTEMPT": null, "COMMENT": null, "RECORD_DURATION": null,
    })
}

fn statistic_get(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let rows: Vec<Value> = st.data.stats.iter().map(|r| stat_json(st, r)).collect();
    let rows = apply_filter(rows, obj(p, "FILTER"), st.data.tz);
    let desc = s(p, "ORDER").is_some_and(|o| o.eq_ignore_ascii_case("DESC"));
    let mut rows = rows;
    if desc {
        rows.reverse();
    }
    Ok(paged(rows, page(p)))
}

fn findbycomm(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let kind = s(p, "type").unwrap_or_default();
    if kind.is_empty() {
        return Err(err(400, "Communication type is not defined", ""));
    }
    if !kind.eq_ignore_ascii_case("PHONE") && !kind.eq_ignore_ascii_case("EMAIL") {
        return Err(err(
            400,
            &format!("Communication type '{kind}' is not supported in current context"),
            "",
        ));
    }
    let values = list_of_strings(get_ci(p, "values"));
    if values.is_empty() {
        return Err(err(400, "Communication values is not defined", ""));
    }
    if values.len() > 20 {
        return Err(err(
            400,
            "",
            "Too many communication values. The maximum is 20.",
        ));
    }
    let only = s(p, "entity_type").and_then(|t| kind_from(&t));
    let mut out = Map::new();
    for k in [CrmKind::Lead, CrmKind::Contact, CrmKind::Company] {
        if only.is_some_and(|o| o != k) {
            continue;
        }
        let mut ids: Vec<u64> = values
            .iter()
            .flat_map(|v| st.data.by_phone(v))
            .filter(|e| e.kind == k)
            .map(|e| e.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if !ids.is_empty() {
            out.insert(k.as_str().into(), json!(ids));
        }
    }
    // §5.3: when one type has 20 or more matches, the others are silently left out.
    if let Some(full) = out
        .iter()
        .find(|(_, v)| v.as_array().is_some_and(|a| a.len() >= 20))
        .map(|(k, _)| k.clone())
    {
        out.retain(|k, _| *k == full);
    }
    Ok(ApiOk::new(if out.is_empty() {
        json!([])
    } else {
        Value::Object(out)
    }))
}

fn multifield_values(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.get("VALUE").and_then(Value::as_str).map(str::to_string))
            .collect(),
        Some(Value::Object(m)) => m
            .values()
            .filter_map(|i| i.get("VALUE").and_then(Value::as_str).map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn lead_add(st: &mut PortalState, caller: &Caller, p: &Map<String, Value>) -> ApiResult {
    let Some(fields) = obj(p, "fields") else {
        return Err(err(400, "", "The parameter 'fields' must be array."));
    };
    let id = st.data.id();
    let title = s(fields, "TITLE").unwrap_or_else(|| format!("Lead #{id}"));
    let assigned = int(fields, "ASSIGNED_BY_ID")
        .map(|x| x as u64)
        .unwrap_or(caller.user_id());
    st.data.entities.push(CrmEntity {
        kind: CrmKind::Lead,
        id,
        title,
        phones: multifield_values(get_ci(fields, "PHONE")),
        assigned_by_id: assigned,
        source: Some(s(fields, "SOURCE_ID").unwrap_or_else(|| "api".into())),
    });
    Ok(ApiOk::new(json!(id)))
}

fn entity_list(st: &PortalState, p: &Map<String, Value>, kind: CrmKind) -> ApiResult {
    let rows: Vec<Value> = st
        .data
        .entities
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| {
            json!({"ID": e.id.to_string(), "TITLE": e.title, "ASSIGNED_BY_ID": e.assigned_by_id.to_string(),
                   "PHONE": e.phones.iter().map(|ph| json!({"VALUE": ph, "VALUE_TYPE": "WORK"})).collect::<Vec<_>>()})
        })
        .collect();
    let mut filter = obj(p, "filter").cloned().unwrap_or_default();
    let phone = filter.remove("PHONE").map(|v| value_text(&v));
    let rows = apply_filter(rows, Some(&filter), st.data.tz)
        .into_iter()
        .filter(|r| match &phone {
            Some(ph) => multifield_values(r.get("PHONE"))
                .iter()
                .any(|v| digits(v) == digits(ph)),
            None => true,
        })
        .collect();
    Ok(paged(select(rows, p), page(p)))
}

fn activity_add(st: &mut PortalState, caller: &Caller, p: &Map<String, Value>) -> ApiResult {
    // §5.1: the older CRM methods answer with an empty `error` and the text in the description.
    let Some(f) = obj(p, "fields") else {
        return Err(err(400, "", "The parameter 'fields' must be array."));
    };
    let comms = get_ci(f, "COMMUNICATIONS").cloned().unwrap_or(Value::Null);
    let first = match &comms {
        Value::Array(a) => a.first().cloned(),
        Value::Object(m) => m.values().next().cloned(),
        _ => None,
    };
    let Some(first) = first.filter(|c| c.get("VALUE").is_some()) else {
        return Err(err(
            400,
            "",
            "The field COMMUNICATIONS is not defined or invalid.",
        ));
    };
    let type_id = int(f, "TYPE_ID").unwrap_or(0);
    if type_id == 0 {
        return Err(err(400, "", "The field TYPE_ID is not defined or invalid."));
    }
    let subject = s(f, "SUBJECT").unwrap_or_default();
    if subject.trim().is_empty() {
        return Err(err(400, "", "The field SUBJECT is not defined or empty."));
    }
    let owner_type = int(f, "OWNER_TYPE_ID").or_else(|| {
        first
            .get("ENTITY_TYPE_ID")
            .and_then(|v| value_text(v).parse().ok())
    });
    let owner_id = int(f, "OWNER_ID").or_else(|| {
        first
            .get("ENTITY_ID")
            .and_then(|v| value_text(v).parse().ok())
    });
    let (Some(owner_type), Some(owner_id)) = (owner_type, owner_id) else {
        return Err(err(400, "", "Could not build binding. Please ensure that owner info and communications are defined correctly."));
    };
    let owner_kind = match owner_type {
        1 => Some(CrmKind::Lead),
        3 => Some(CrmKind::Contact),
        4 => Some(CrmKind::Company),
        _ => None,
    };
    if owner_type != 2
        && !owner_kind.is_some_and(|k| {
            st.data
                .entities
                .iter()
                .any(|e| e.kind == k && e.id == owner_id as u64)
        })
    {
        return Err(err(400, "", "Could not build binding. Please ensure that owner info and communications are defined correctly."));
    }
    let responsible = int(f, "RESPONSIBLE_ID")
        .map(|x| x as u64)
        .unwrap_or(caller.user_id());
    if st.data.active_user(responsible).is_none() {
        return Err(err(400, "", "Responsible user is not found."));
    }
    let id = st.data.id();
    st.data.activities.push(Activity {
        id,
        owner_type_id: owner_type,
        owner_id: owner_id as u64,
        type_id,
        subject,
        direction: int(f, "DIRECTION").unwrap_or(0),
        start_time: s(f, "START_TIME"),
        end_time: s(f, "END_TIME"),
        completed: s(f, "COMPLETED").is_some_and(|c| c.eq_ignore_ascii_case("Y")),
        responsible_id: responsible,
        description: s(f, "DESCRIPTION").unwrap_or_default(),
        originator_id: s(f, "ORIGINATOR_ID"),
        origin_id: s(f, "ORIGIN_ID"),
        provider_id: s(f, "PROVIDER_ID").unwrap_or_else(|| "CRM_CALL".into()),
        communications: comms,
        user_fields: super::fields::user_values(f),
    });
    Ok(ApiOk::new(json!(id)))
}

fn activity_update(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let id = int(p, "id").unwrap_or(0) as u64;
    let fields = obj(p, "fields").cloned().unwrap_or_default();
    if fields.is_empty() {
        return Err(err(400, "", "The parameter 'fields' must be array."));
    }
    let Some(a) = st.data.activities.iter_mut().find(|a| a.id == id) else {
        return Err(err(400, "", "Not found"));
    };
    if let Some(d) = s(&fields, "DESCRIPTION") {
        a.description = d;
    }
    if let Some(d) = s(&fields, "SUBJECT") {
        a.subject = d;
    }
    if let Some(d) = s(&fields, "END_TIME") {
        a.end_time = Some(d);
    }
    Ok(ApiOk::new(json!(true)))
}

fn activity_json(a: &Activity) -> Value {
    json!({
        "ID": a.id.to_string(), "OWNER_TYPE_ID": a.owner_type_id.to_string(), "OWNER_ID": a.owner_id.to_string(),
        "TYPE_ID": a.type_id.to_string(), "SUBJECT": a.subject, "DIRECTION": a.direction.to_string(),
        "START_TIME": a.start_time, "END_TIME": a.end_time, "COMPLETED": if a.completed { "Y" } else { "N" },
        "RESPONSIBLE_ID": a.responsible_id.to_string(), "DESCRIPTION": a.description,
        "ORIGINATOR_ID": a.originator_id, "ORIGIN_ID": a.origin_id, "PROVIDER_ID": a.provider_id,
        "PROVIDER_TYPE_ID": "CALL",
    })
}

fn activity_list(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let rows: Vec<Value> = st.data.activities.iter().map(activity_json).collect();
    let rows = apply_filter(rows, obj(p, "filter"), st.data.tz);
    let start = int(p, "start").unwrap_or(0);
    let rows = select(rows, p);
    if start < 0 {
        // `start=-1` skips counting (§1.4).
        let rows: Vec<Value> = rows.into_iter().take(50).collect();
        return Ok(ApiOk::new(Value::Array(rows)));
    }
    Ok(paged(rows, start as usize))
}

fn task_json(st: &PortalState, t: &Task) -> Value {
    json!({
        "id": t.id.to_string(), "title": t.title, "description": t.description,
        "responsibleId": t.responsible_id.to_string(), "createdBy": t.created_by.to_string(),
        "deadline": t.deadline, "status": t.status.to_string(), "xmlId": t.xml_id,
        "createdDate": st.data.fmt(st.data.local(t.created_at)),
        "guid": format!("{{{:08x}-0000-4000-8000-{:012x}}}", t.id, t.id),
        "ufCrmTask": t.uf_crm_task,
    })
}

fn task_add(
    st: &mut PortalState,
    caller: &Caller,
    p: &Map<String, Value>,
    now: DateTime<Utc>,
) -> ApiResult {
    let Some(f) = obj(p, "fields") else {
        return Err(err(400, "ERROR_CORE", "Fields are not specified"));
    };
    let title = s(f, "TITLE").unwrap_or_default();
    if title.trim().is_empty() {
        return Err(core("TITLE: field is required"));
    }
    let Some(responsible) = int(f, "RESPONSIBLE_ID") else {
        return Err(core("RESPONSIBLE_ID: field is required"));
    };
    if st.data.active_user(responsible as u64).is_none() {
        return Err(core("Responsible user not found"));
    }
    let deadline = match s(f, "DEADLINE") {
        Some(d) => Some(
            st.data
                .fmt(parse_iso(&d, st.data.tz).ok_or_else(|| core("DEADLINE: wrong date format"))?),
        ),
        None => None,
    };
    let id = st.data.id();
    let task = Task {
        id,
        title,
        description: s(f, "DESCRIPTION").unwrap_or_default(),
        responsible_id: responsible as u64,
        created_by: int(f, "CREATED_BY")
            .map(|x| x as u64)
            .unwrap_or(caller.user_id()),
        deadline,
        uf_crm_task: list_of_strings(get_ci(f, "UF_CRM_TASK")),
        status: 2,
        xml_id: s(f, "XML_ID"),
        created_at: now,
        user_fields: super::fields::user_values(f),
    };
    let mut body = task_json(st, &task);
    if let Some(m) = body.as_object_mut() {
        // §6: UF_CRM_TASK comes back only when selected.
        m.remove("ufCrmTask");
    }
    st.data.tasks.push(task);
    Ok(ApiOk::new(json!({"task": body})))
}

fn task_list(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let rows: Vec<Value> = st
        .data
        .tasks
        .iter()
        .map(|t| {
            json!({"ID": t.id.to_string(), "TITLE": t.title, "RESPONSIBLE_ID": t.responsible_id.to_string(),
                   "CREATED_BY": t.created_by.to_string(), "STATUS": t.status.to_string(), "XML_ID": t.xml_id,
                   "UF_CRM_TASK": t.uf_crm_task, "CREATED_DATE": st.data.fmt(st.data.local(t.created_at)), "DEADLINE": t.deadline})
        })
        .collect();
    let mut filter = obj(p, "filter").cloned().unwrap_or_default();
    let crm = filter
        .remove("UF_CRM_TASK")
        .map(|v| list_of_strings(Some(&v)));
    let rows: Vec<Value> = apply_filter(rows, Some(&filter), st.data.tz)
        .into_iter()
        .filter(|r| match &crm {
            Some(want) => list_of_strings(r.get("UF_CRM_TASK"))
                .iter()
                .any(|b| want.contains(b)),
            None => true,
        })
        .collect();
    let ids: Vec<u64> = rows
        .iter()
        .filter_map(|r| r["ID"].as_str().and_then(|s| s.parse().ok()))
        .collect();
    let tasks: Vec<Value> = ids
        .iter()
        .filter_map(|id| st.data.tasks.iter().find(|t| t.id == *id))
        .map(|t| task_json(st, t))
        .collect();
    let ok = paged(tasks, page(p));
    Ok(ApiOk {
        result: json!({"tasks": ok.result}),
        ..ok
    })
}

fn task_update(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let id = int(p, "taskId").unwrap_or(0) as u64;
    let fields = obj(p, "fields").cloned().unwrap_or_default();
    if fields.is_empty() {
        return Err(core("Fields are not specified"));
    }
    let tz = st.data.tz;
    let Some(t) = st.data.tasks.iter_mut().find(|t| t.id == id) else {
        return Err(err(400, "ERROR_CORE", "Task not found or not accessible"));
    };
    if let Some(v) = s(&fields, "TITLE") {
        t.title = v;
    }
    if let Some(v) = int(&fields, "RESPONSIBLE_ID") {
        t.responsible_id = v as u64;
    }
    if let Some(v) = s(&fields, "DESCRIPTION") {
        t.description = v;
    }
    if let Some(v) = s(&fields, "DEADLINE") {
        t.deadline = parse_iso(&v, tz).map(|d| d.to_rfc3339());
    }
    if get_ci(&fields, "UF_CRM_TASK").is_some() {
        t.uf_crm_task = list_of_strings(get_ci(&fields, "UF_CRM_TASK"));
    }
    let t = t.clone();
    Ok(ApiOk::new(json!({"task": task_json(st, &t)})))
}

fn task_set_status(st: &mut PortalState, p: &Map<String, Value>, status: i64) -> ApiResult {
    let id = int(p, "taskId").unwrap_or(0) as u64;
    let Some(t) = st.data.tasks.iter_mut().find(|t| t.id == id) else {
        return Err(err(400, "ERROR_CORE", "Task not found or not accessible"));
    };
    t.status = status;
    let t = t.clone();
    Ok(ApiOk::new(json!({"task": task_json(st, &t)})))
}
