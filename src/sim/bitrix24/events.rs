//! The simulated portal's events: `event.bind` / `event.get` / `event.unbind`, and the
//! deliveries a real portal makes — a click on a number in a CRM card (`ONEXTERNALCALLSTART`,
//! after registering the call itself, without `EXTERNAL_CALL_ID`) and a CRM callback form
//! (`ONEXTERNALCALLBACKSTART`, no `CALL_ID`) — POSTed form-encoded with PHP bracket keys.

// A simulator calls the application as the upstream would: no limiter of ubsync applies.
#![allow(clippy::disallowed_methods)]

use serde_json::{json, Map, Value};

use super::{ApiError, ApiOk, ApiResult, Bitrix24Sim, PortalState};
use crate::phpquery;
use crate::sim::scenario::CrmKind;

/// The application token the simulated portal sends with events (and with the install
/// callback).
pub const SIM_APPLICATION_TOKEN: &str = "sim-application-token";

fn text(p: &Map<String, Value>, k: &str) -> Option<String> {
    p.iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(k))
        .and_then(|(_, v)| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        })
}

pub(super) fn bind(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let Some(event) = text(p, "event").map(|e| e.to_uppercase()) else {
        return Err(ApiError::new(
            400,
            "ERROR_EVENT_NOT_FOUND",
            "Event not found",
        ));
    };
    if !matches!(
        event.as_str(),
        "ONEXTERNALCALLSTART" | "ONEXTERNALCALLBACKSTART" | "ONAPPUNINSTALL" | "ONAPPINSTALL"
    ) {
        return Err(ApiError::new(
            400,
            "ERROR_EVENT_NOT_FOUND",
            "Event not found",
        ));
    }
    let handler = text(p, "handler").unwrap_or_default();
    let offline = text(p, "event_type").is_some_and(|t| t.eq_ignore_ascii_case("offline"));
    if handler.is_empty() && !offline {
        return Err(ApiError::new(400, "WRONG_HANDLER_URL", "Wrong handler URL"));
    }
    if st.events.iter().any(|(e, h)| *e == event && *h == handler) {
        return Err(ApiError::new(
            400,
            "ERROR_EVENT_ALREADY_BOUND",
            "Handler already binded",
        ));
    }
    st.events.push((event, handler));
    Ok(ApiOk::new(json!(true)))
}

pub(super) fn get(st: &PortalState) -> ApiResult {
    Ok(ApiOk::new(Value::Array(
        st.events
            .iter()
            .map(|(e, h)| json!({"event": e, "handler": h, "auth_type": "0", "offline": if h.is_empty() { 1 } else { 0 }}))
            .collect(),
    )))
}

pub(super) fn unbind(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let event = text(p, "event")
        .map(|e| e.to_uppercase())
        .unwrap_or_default();
    let handler = text(p, "handler");
    let before = st.events.len();
    st.events
        .retain(|(e, h)| !(*e == event && handler.as_ref().is_none_or(|x| x == h)));
    Ok(ApiOk::new(json!({"count": before - st.events.len()})))
}

/// `event.offline.get`: with `clear=1` (default) the events are removed as they are read; with
/// `clear=0` they are reserved under a `process_id` (the one given, else a new one) until
/// `event.offline.clear`; a given `process_id` gets its own reserved events again.
pub(super) fn offline_get(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let clear = p
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("clear"))
        .map(|(_, v)| !matches!(v, Value::Number(n) if n.as_i64() == Some(0)) && v != "0")
        .unwrap_or(true);
    let limit = p
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("limit"))
        .and_then(|(_, v)| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .unwrap_or(50) as usize;
    if !clear && !st.offline_extended {
        return Err(ApiError::new(
            400,
            "ERROR_FEATURE_NOT_AVAILABLE",
            "Not available on this plan",
        ));
    }
    // A given `process_id` takes the events it reserved before (not yet cleared) again, then
    // reserves free ones under it ("to select again the records this process has not processed").
    let given = text(p, "process_id").filter(|p| !p.is_empty());
    let process = given.clone().unwrap_or_else(|| {
        format!(
            "p{}",
            st.offline.len() + st.events.len() + rand::random::<u16>() as usize
        )
    });
    let mut events = Vec::new();
    for (id, ev, data, reserved) in st.offline.iter_mut() {
        if events.len() == limit {
            break;
        }
        if reserved.is_some() && (given.is_none() || *reserved != given) {
            continue;
        }
        events.push(json!({"ID": id.to_string(), "TIMESTAMP_X": "", "EVENT_NAME": ev, "EVENT_DATA": data, "EVENT_ADDITIONAL": {}, "MESSAGE_ID": format!("m{id}")}));
        if !clear {
            *reserved = Some(process.clone());
        }
    }
    if clear {
        let ids: Vec<String> = events
            .iter()
            .filter_map(|e| e["ID"].as_str().map(String::from))
            .collect();
        st.offline.retain(|(id, ..)| !ids.contains(&id.to_string()));
    }
    Ok(ApiOk::new(
        json!({"process_id": if clear { Value::Null } else { json!(process) }, "events": events}),
    ))
}

/// `event.offline.clear {process_id, id[]}`.
pub(super) fn offline_clear(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let process = text(p, "process_id").unwrap_or_default();
    let ids: Vec<String> = match p
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("id"))
        .map(|(_, v)| v)
    {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        Some(Value::Object(o)) => o
            .values()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        _ => Vec::new(),
    };
    st.offline.retain(|(id, _, _, r)| {
        !(r.as_deref() == Some(process.as_str())
            && (ids.is_empty() || ids.contains(&id.to_string())))
    });
    Ok(ApiOk::new(json!(true)))
}

/// `feature.get {CODE}`.
pub(super) fn feature_get(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let code = text(p, "CODE").unwrap_or_default();
    let on = match code.as_str() {
        "rest_offline_extended" => st.offline_extended,
        _ => false,
    };
    Ok(ApiOk::new(json!({"value": if on { "Y" } else { "N" }})))
}

impl Bitrix24Sim {
    /// Whether `event.offline.get` may reserve (the plan has `rest_offline_extended`).
    pub fn set_offline_extended(&self, on: bool) {
        self.lock().offline_extended = on;
    }

    /// Events waiting in the offline queue.
    pub fn offline_queue_len(&self) -> usize {
        self.lock().offline.len()
    }

    /// The events bound, as (event, handler).
    pub fn bound_events(&self) -> Vec<(String, String)> {
        self.lock().events.clone()
    }

    /// POSTs `event` with `data` to every handler bound for it; returns the statuses.
    pub async fn deliver_event(&self, event: &str, data: Value, token: &str) -> Vec<u16> {
        let (handlers, domain, member) = {
            let mut st = self.lock();
            // Offline bindings queue the event for `event.offline.get`.
            if st.events.iter().any(|(e, h)| e == event && h.is_empty()) {
                let id = st.offline.iter().map(|(i, ..)| *i).max().unwrap_or(100) + 1;
                st.offline.push((id, event.to_string(), data.clone(), None));
            }
            let handlers: Vec<String> = st
                .events
                .iter()
                .filter(|(e, h)| e == event && !h.is_empty())
                .map(|(_, h)| h.clone())
                .collect();
            let domain = st
                .base_url
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_string();
            (handlers, domain, st.member_id.clone())
        };
        let body = json!({
            "event": event,
            "event_handler_id": "1055",
            "data": data,
            "ts": self.clock.now().timestamp().to_string(),
            "auth": {"domain": domain, "member_id": member, "application_token": token, "status": "L"},
        });
        let form = phpquery::build(body.as_object().expect("object"));
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("a plain HTTP client");
        let mut out = Vec::new();
        for h in handlers {
            let r = http
                .post(&h)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.clone())
                .send()
                .await;
            out.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
        }
        out
    }

    /// A user clicks `number` in a CRM card: the portal registers the call (no
    /// `EXTERNAL_CALL_ID`) and sends `ONEXTERNALCALLSTART`. Returns the `CALL_ID`.
    pub async fn click_to_call(
        &self,
        user_id: u64,
        number: &str,
        crm: Option<(CrmKind, u64)>,
    ) -> String {
        let call_id = {
            let mut st = self.lock();
            let now = self.clock.now();
            let mut p = Map::new();
            p.insert("USER_ID".into(), json!(user_id));
            p.insert("PHONE_NUMBER".into(), json!(number));
            p.insert("TYPE".into(), json!(1));
            if let Some((k, id)) = crm {
                p.insert("CRM_ENTITY_TYPE".into(), json!(k.as_str()));
                p.insert("CRM_ENTITY_ID".into(), json!(id));
            }
            super::methods::register_internal(&mut st, &p, now)
        };
        let mut data = json!({
            "PHONE_NUMBER": number, "PHONE_NUMBER_INTERNATIONAL": number, "EXTENSION": "",
            "USER_ID": user_id.to_string(), "CALL_LIST_ID": "0", "LINE_NUMBER": "", "IS_MOBILE": "0",
            "CALL_ID": call_id,
        });
        if let Some((k, id)) = crm {
            data["CRM_ENTITY_TYPE"] = json!(k.as_str());
            data["CRM_ENTITY_ID"] = json!(id.to_string());
        }
        self.deliver_event("ONEXTERNALCALLSTART", data, SIM_APPLICATION_TOKEN)
            .await;
        call_id
    }

    /// A visitor fills in a CRM callback form: `ONEXTERNALCALLBACKSTART` (no `CALL_ID`).
    pub async fn callback_request(
        &self,
        number: &str,
        crm: Option<(CrmKind, u64)>,
        text: &str,
    ) -> Vec<u16> {
        let mut data = json!({"PHONE_NUMBER": number, "TEXT": text, "VOICE": "ruinternalfemale", "LINE_NUMBER": ""});
        if let Some((k, id)) = crm {
            data["CRM_ENTITY_TYPE"] = json!(k.as_str());
            data["CRM_ENTITY_ID"] = json!(id.to_string());
        }
        self.deliver_event("ONEXTERNALCALLBACKSTART", data, SIM_APPLICATION_TOKEN)
            .await
    }
}
