//! Unitalk's outgoing call webhooks (`telephony-events.md` §5): the body's event and call
//! object, as Standard JSON (`{"event", "call": {...}}`) or form-encoded `call_*` variables,
//! turned into the shape of a history record so one parser reads both.

use serde_json::Value;

/// The call object of a webhook body: Standard JSON (`{"event", "call": {...}}`) or the
/// form-encoded `call_*` variables. Returns the event name and the call.
pub fn webhook_call(body: &str, content_type: Option<&str>) -> Result<(String, Value), String> {
    let form = content_type.is_some_and(|t| t.contains("x-www-form-urlencoded"))
        || (!body.trim_start().starts_with('{') && body.contains('='));
    if !form {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON ({e})"))?;
        let event = v
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_uppercase();
        let call = v
            .get("call")
            .cloned()
            .filter(Value::is_object)
            .ok_or("no `call` object")?;
        return Ok((event, call));
    }
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.is_empty() {
        return Err("an empty form".into());
    }
    let mut call = serde_json::Map::new();
    let mut to = Vec::new();
    let mut event = String::new();
    for (k, v) in pairs {
        let k = k.to_lowercase();
        if k == "event" {
            event = v.to_uppercase();
            continue;
        }
        let Some(field) = k.strip_prefix("call_") else {
            continue;
        };
        if field.starts_with("to") {
            to.push(Value::String(v));
            continue;
        }
        let name = match field {
            "id" => "id",
            "dbid" => "dbid",
            "from" => "from",
            "outernumber" => "outerNumber",
            "secondstalk" => "secondsTalk",
            "secondsfulltime" => "secondsFullTime",
            "direction" => "direction",
            "date" => "date",
            "state" => "state",
            "link" => "link",
            "lastgroupname" => "lastGroupName",
            "source" => "source",
            "cause" => "cause",
            _ => continue,
        };
        call.insert(name.into(), Value::String(v));
    }
    call.insert("to".into(), Value::Array(to));
    Ok((event, Value::Object(call)))
}

/// Whether an event carries a call that has ended (only then are its durations and state
/// final).
pub fn is_final(event: &str, call: &Value) -> bool {
    match event {
        "CALL_END" => true,
        "" => call
            .get("state")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty() && !s.eq_ignore_ascii_case("DIALING")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_form_bodies_give_the_same_call() {
        let (e, c) = webhook_call(
            r#"{"event": "call_end", "call": {"id": 7, "from": "380501112233", "to": ["101"], "state": "ANSWER"}}"#,
            Some("application/json"),
        )
        .unwrap();
        assert_eq!(e, "CALL_END");
        assert!(is_final(&e, &c));
        let (e, f) = webhook_call(
            "event=call_end&call_id=7&call_from=380501112233&call_to0=101&call_state=ANSWER",
            None,
        )
        .unwrap();
        assert_eq!(e, "CALL_END");
        assert_eq!(f["to"], serde_json::json!(["101"]));
        assert_eq!(f["from"], c["from"]);
        assert!(webhook_call("{}", None).is_err(), "no call object");
        assert!(!is_final("CALL_START", &c));
        assert!(!is_final("", &serde_json::json!({"state": "DIALING"})));
    }
}
