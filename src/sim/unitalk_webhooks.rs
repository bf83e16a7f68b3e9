//! The Unitalk simulator's outgoing webhooks: `CALL_NEW` … `CALL_END` events for ended calls,
//! POSTed to a URL, with the faults that matter (lost, duplicated, out of order, form bodies,
//! and a `dbid` that differs from the history `id`).

// A simulator calls the application as the upstream would: no limiter of ubsync applies.
#![allow(clippy::disallowed_methods)]

use std::collections::HashSet;

use serde_json::{json, Value};

use super::scenario::SimCall;
use super::unitalk::UnitalkSim;

/// How a delivery round behaves.
#[derive(Debug, Clone, Default)]
pub struct WebhookOptions {
    /// Calls whose events are lost.
    pub lose: HashSet<u64>,
    /// Every event is sent twice.
    pub duplicate: bool,
    /// `CALL_END` goes first, then the earlier events.
    pub reverse: bool,
    /// `dbid = id + offset` (0: `dbid` is the history `id`, as believed).
    pub dbid_offset: u64,
    /// Form-encoded `call_*` variables instead of Standard JSON.
    pub form: bool,
}

fn events(c: &SimCall, dbid_offset: u64, date: &str) -> Vec<Value> {
    let call = |state: Value, end: bool| {
        let mut v = json!({
            "id": c.id * 7 + 13,
            "dbid": c.id + dbid_offset,
            "from": c.from,
            "to": c.to,
            "outerNumber": c.outer_number,
            "direction": c.direction,
            "date": date,
            "callback": false,
            "state": state,
            "source": c.source,
        });
        if let Some(g) = &c.group {
            v["lastGroupName"] = json!(g);
        }
        if let Some(m) = &c.meta {
            v["meta"] = json!(m);
        }
        if end {
            v["secondsFullTime"] = json!(c.seconds_full);
            v["secondsTalk"] = json!(c.seconds_talk);
            v["cause"] = json!(c.cause);
            if let Some(l) = &c.link {
                v["link"] = json!(l);
            }
        }
        v
    };
    let mut out = vec![json!({"event": "CALL_NEW", "call": call(Value::Null, false)})];
    if c.state == "ANSWER" {
        out.push(json!({"event": "CALL_ANSWER", "call": call(Value::Null, false)}));
    }
    out.push(json!({"event": "CALL_END", "call": call(json!(c.state), true)}));
    out
}

/// The `CALL_END` event of `c` (Standard JSON), `dbid` = `id + dbid_offset`.
pub fn end_event(c: &SimCall, dbid_offset: u64) -> Value {
    let date = c.date.format("%Y-%m-%d %H:%M:%S").to_string();
    events(c, dbid_offset, &date)
        .pop()
        .expect("every call has an end event")
}

fn form(ev: &Value) -> String {
    let mut f = url::form_urlencoded::Serializer::new(String::new());
    f.append_pair("event", ev["event"].as_str().unwrap_or(""));
    if let Some(call) = ev["call"].as_object() {
        for (k, v) in call {
            match (k.as_str(), v) {
                ("to", Value::Array(a)) => {
                    for (i, t) in a.iter().enumerate() {
                        f.append_pair(&format!("call_to_{i}"), t.as_str().unwrap_or(""));
                    }
                }
                (_, Value::Null) => {}
                (k, Value::String(s)) => {
                    f.append_pair(&format!("call_{}", k.to_lowercase()), s);
                }
                (k, other) => {
                    f.append_pair(&format!("call_{}", k.to_lowercase()), &other.to_string());
                }
            }
        }
    }
    f.finish()
}

impl UnitalkSim {
    /// POSTs the events of every call that has ended and was not delivered before to `url`;
    /// returns the HTTP statuses answered.
    pub async fn deliver_webhooks(&self, url: &str, opts: &WebhookOptions) -> Vec<u16> {
        let due = self.take_undelivered();
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("a plain HTTP client");
        let mut statuses = Vec::new();
        for (c, date) in due {
            if opts.lose.contains(&c.id) {
                continue;
            }
            let mut evs = events(&c, opts.dbid_offset, &date);
            if opts.reverse {
                evs.reverse();
            }
            for ev in evs {
                for _ in 0..if opts.duplicate { 2 } else { 1 } {
                    let req = if opts.form {
                        http.post(url)
                            .header("content-type", "application/x-www-form-urlencoded")
                            .body(form(&ev))
                    } else {
                        http.post(url).json(&ev)
                    };
                    statuses.push(req.send().await.map(|r| r.status().as_u16()).unwrap_or(0));
                }
            }
        }
        statuses
    }
}
