//! Events (`telephony-events.md` §1–§3): the telephony events ubsync handles as they arrive
//! (an online POST form or an offline queue entry), `event.get` / `event.bind`, the offline
//! queue (`event.offline.get` / `clear`) and `feature.get`.

use serde_json::{json, Value};

use crate::bitrix24::wire::{as_i64, as_text};

/// A method and its parameters, for a request of its own.
pub type Request = (&'static str, Value);

/// An event as delivered: the event's name (upper case) and its `data` fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    /// `CALL_ID` of the call Bitrix24 registered (`ONEXTERNALCALLSTART`).
    pub call_id: Option<String>,
    pub user_id: Option<i64>,
    /// `PHONE_NUMBER_INTERNATIONAL`, else `PHONE_NUMBER`.
    pub number: Option<String>,
    pub line_number: Option<String>,
    pub crm_entity_type: Option<String>,
    pub crm_entity_id: Option<i64>,
    /// A callback form's whisper text.
    pub text: Option<String>,
}

impl Event {
    /// Decodes an event from its form (online: PHP-style fields parsed into nested objects) or
    /// its stored offline entry (`{"event", "data"}`); absent or blank fields are `None`.
    pub fn decode(form: &Value) -> Self {
        let text = |v: &Value, k: &str| {
            v.get(k)
                .and_then(as_text)
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let data = form.get("data").cloned().unwrap_or(Value::Null);
        Self {
            name: text(form, "event").unwrap_or_default().to_uppercase(),
            call_id: text(&data, "CALL_ID"),
            user_id: text(&data, "USER_ID").and_then(|u| u.parse().ok()),
            number: text(&data, "PHONE_NUMBER_INTERNATIONAL").or(text(&data, "PHONE_NUMBER")),
            line_number: text(&data, "LINE_NUMBER"),
            crm_entity_type: text(&data, "CRM_ENTITY_TYPE").map(|t| t.to_uppercase()),
            crm_entity_id: text(&data, "CRM_ENTITY_ID").and_then(|v| v.parse().ok()),
            text: text(&data, "TEXT"),
        }
    }
}

/// `event.get`: the events bound for the application.
pub fn bound() -> Request {
    ("event.get", json!({}))
}

/// An event binding: the event (upper case) and its handler (`None` for an offline one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub event: String,
    pub handler: Option<String>,
}

/// An `event.get` answer.
pub fn bindings(v: &Value) -> Vec<Binding> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    Some(Binding {
                        event: e.get("event").and_then(as_text)?.to_uppercase(),
                        handler: if e.get("offline").and_then(as_i64) == Some(1) {
                            None
                        } else {
                            Some(e.get("handler").and_then(as_text).unwrap_or_default())
                        },
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `event.bind` to a handler, or to the offline queue with `None`.
pub fn bind(event: &str, handler: Option<&str>) -> Request {
    match handler {
        None => (
            "event.bind",
            json!({"event": event, "event_type": "offline"}),
        ),
        Some(h) => ("event.bind", json!({"event": event, "handler": h})),
    }
}

/// `feature.get` of a plan feature.
pub fn feature(code: &str) -> Request {
    ("feature.get", json!({ "CODE": code }))
}

/// Whether a `feature.get` answer says the feature is on.
pub fn feature_on(v: &Value) -> bool {
    v.get("value").and_then(as_text).as_deref() == Some("Y")
}

/// `event.offline.get`: reserve (`clear = false`) or take up to `limit` queued events.
pub fn offline_get(clear: bool, limit: u32) -> Request {
    (
        "event.offline.get",
        json!({"clear": i32::from(clear), "limit": limit}),
    )
}

/// `event.offline.get` reserving (`clear=0`) under ubsync's own `process_id`: the events that
/// process reserved and has not cleared come back with the free ones it reserves now, so a
/// reservation whose answer was lost is never hidden in the portal.
pub fn offline_reserve(process_id: &str, limit: u32) -> Request {
    (
        "event.offline.get",
        json!({"clear": 0, "limit": limit, "process_id": process_id}),
    )
}

/// One queued offline event.
#[derive(Debug, Clone, PartialEq)]
pub struct OfflineEvent {
    pub id: Option<String>,
    pub name: Value,
    pub data: Value,
}

impl OfflineEvent {
    /// The form [`Event::decode`] reads, with the queue's id beside it.
    pub fn stored_form(&self) -> Value {
        json!({"event": self.name, "data": self.data, "offline_id": self.id})
    }
}

/// An `event.offline.get` answer: the reservation (`process_id`) and the events.
pub fn offline_events(v: &Value) -> (Option<String>, Vec<OfflineEvent>) {
    let events = v
        .get("events")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| OfflineEvent {
                    id: e.get("ID").and_then(as_text),
                    name: e.get("EVENT_NAME").cloned().unwrap_or(Value::Null),
                    data: e.get("EVENT_DATA").cloned().unwrap_or(Value::Null),
                })
                .collect()
        })
        .unwrap_or_default();
    (v.get("process_id").and_then(as_text), events)
}

/// `event.offline.clear` of reserved events.
pub fn offline_clear(process_id: &str, ids: &[String]) -> Request {
    (
        "event.offline.clear",
        json!({"process_id": process_id, "id": ids}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_form_decodes_with_blanks_as_none() {
        let e = Event::decode(&json!({"event": "onExternalCallStart", "data": {
            "CALL_ID": "externalCall.1", "USER_ID": "5", "PHONE_NUMBER": "0501112233",
            "PHONE_NUMBER_INTERNATIONAL": "+380501112233", "CRM_ENTITY_TYPE": "contact",
            "CRM_ENTITY_ID": "797", "LINE_NUMBER": " ",
        }}));
        assert_eq!(e.name, "ONEXTERNALCALLSTART");
        assert_eq!(e.user_id, Some(5));
        assert_eq!(e.number.as_deref(), Some("+380501112233"));
        assert_eq!(e.crm_entity_type.as_deref(), Some("CONTACT"));
        assert_eq!(e.crm_entity_id, Some(797));
        assert_eq!(e.line_number, None);
        assert_eq!(Event::decode(&Value::Null), Event::default());
    }

    #[test]
    fn offline_entries_round_trip_into_the_form_events_are_read_from() {
        let (process, events) = offline_events(&json!({"process_id": "p1", "events": [
            {"ID": "9", "EVENT_NAME": "ONEXTERNALCALLSTART", "EVENT_DATA": {"CALL_ID": "c"}},
        ]}));
        assert_eq!(process.as_deref(), Some("p1"));
        let e = Event::decode(&events[0].stored_form());
        assert_eq!(
            (e.name.as_str(), e.call_id.as_deref()),
            ("ONEXTERNALCALLSTART", Some("c"))
        );
        assert_eq!(
            bindings(
                &json!([{"event": "onexternalcallstart", "handler": "h"}, {"event": "ONAPPUNINSTALL", "offline": 1}])
            ),
            vec![
                Binding {
                    event: "ONEXTERNALCALLSTART".into(),
                    handler: Some("h".into())
                },
                Binding {
                    event: "ONAPPUNINSTALL".into(),
                    handler: None
                },
            ]
        );
    }
}
