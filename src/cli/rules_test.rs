//! `ubsync rules test`: the rules run over stored calls, printing per call which rules fired and
//! what would be sent. Reads the state file; writes nothing anywhere.

use std::collections::HashSet;

use chrono::Duration;
use serde_json::{json, Value};

use crate::clock::Clock;
use crate::config::Config;
use crate::store::Store;
use crate::sync::call::{classify, Disposition};
use crate::sync::plan;
use crate::timezone::rfc3339_in;

/// Most calls one run shows.
const MAX_CALLS: usize = 500;

/// What the rules decide for one stored call.
fn decide(cfg: &Config, store: &Store, known: &HashSet<String>, id: &str, raw: &str) -> Value {
    let tz = cfg.bitrix24.timezone;
    let record: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
    let call = match crate::unitalk::wire::parse_call_as(
        &record,
        cfg.unitalk.timezone,
        &cfg.unitalk.call_id_field,
    ) {
        Ok(c) => c,
        Err(e) => return json!({"call_id": id, "decision": "quarantine", "why": e.reason}),
    };
    let f = match classify(&call, known, &cfg.sync, &cfg.rules) {
        Disposition::Push(f) => *f,
        Disposition::Skip(why) => return json!({"call_id": id, "decision": "skip", "why": why}),
        Disposition::NotFinal => {
            return json!({"call_id": id, "decision": "wait", "why": "still DIALING"})
        }
        Disposition::Quarantine(why) => {
            return json!({"call_id": id, "decision": "quarantine", "why": why})
        }
    };
    let base = json!({
        "call_id": id,
        "started": rfc3339_in(f.started_at, tz),
        "direction": if f.way == crate::sync::call::Way::In { "incoming" } else { "outgoing" },
        "state": f.state.as_str(),
        "client_as_sent": if f.way == crate::sync::call::Way::In { call.from.clone() } else { call.to.first().cloned().unwrap_or_default() },
        "client": f.client_number,
        "inner_line": f.operator_line,
        "outer_line": f.outer,
        "group": f.group,
        "talk": f.seconds_talk,
    });
    let mut v = base;
    if let Some(script) = &cfg.rules.script {
        match script.filter(&crate::rules::script::call_map(&f, Some(&record))) {
            Ok(Some(reason)) => {
                v["decision"] = json!("skip");
                v["why"] = json!(format!("the rules script: {reason}"));
                return v;
            }
            Ok(None) => {}
            Err(e) => {
                v["decision"] = json!("quarantine");
                v["why"] = json!(e);
                return v;
            }
        }
    }
    if let Some(rule) = cfg.rules.skip(&f) {
        v["decision"] = json!("skip");
        v["why"] = json!(format!("rule \"{rule}\" (rules.skip)"));
        return v;
    }
    v["decision"] = json!("push");
    if !f.missed {
        return v;
    }
    let task = if !cfg.tasks.enabled {
        json!({"decision": "none", "why": "tasks.enabled = false"})
    } else if let Some(rule) = cfg.rules.skip_task(&f) {
        json!({"decision": "none", "why": format!("rule \"{rule}\" (rules.skip_task)")})
    } else {
        let reached = if cfg.tasks.close_on_callback {
            store
                .reached_after(&f.client_number, f.started_at)
                .ok()
                .flatten()
        } else {
            None
        };
        let open = if cfg.tasks.one_per_client {
            store.open_task_for(&f.client_number).ok().flatten()
        } else {
            None
        };
        let values = crate::rules::values(&f, tz, f.operator_line.as_deref(), None);
        let mut t = json!({
            "decision": "create",
            "title": cfg.tasks.title.render(&values),
            "deadline": rfc3339_in(plan::task_deadline(cfg, &f), tz),
            "created_from": rfc3339_in(plan::task_due_at(cfg, &f), tz),
            "description": plan::task_description(cfg, &f, f.operator_line.as_deref(), None),
        });
        if let Some((by, _)) = reached {
            t = json!({"decision": "none", "why": format!("the client was reached after it (call {by})")});
        } else if let Some(open) = open.filter(|o| o.owner.call_id != f.id) {
            t["decision"] = json!("fold");
            t["why"] = json!(format!(
                "the client has open task {} (call {}): this call is added to it (tasks.one_per_client)",
                open.task_id, open.owner.call_id
            ));
        }
        t
    };
    v["task"] = task;
    v
}

fn print_block(v: &Value) {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut lines = vec![format!(
        "call {}  {} {} {}  {}",
        s("call_id"),
        s("started"),
        s("direction"),
        s("client"),
        s("state")
    )];
    if v.get("client").is_some() && s("client_as_sent") != s("client") {
        lines.push(format!(
            "  number     {:?} → {}",
            s("client_as_sent"),
            s("client")
        ));
    }
    let decision = match s("decision").as_str() {
        "push" => "pushed to Bitrix24".to_string(),
        "skip" => format!("skipped: {}", s("why")),
        "wait" => format!("waits: {}", s("why")),
        other => format!("{other}: {}", s("why")),
    };
    lines.push(format!("  decision   {decision}"));
    if let Some(t) = v.get("task") {
        let ts = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        match ts("decision").as_str() {
            "none" => lines.push(format!("  task       none: {}", ts("why"))),
            d => {
                if d == "fold" {
                    lines.push(format!("  task       {}", ts("why")));
                } else {
                    lines.push(format!("  task       \"{}\"", ts("title")));
                }
                lines.push(format!(
                    "             deadline {}, created from {}",
                    ts("deadline"),
                    ts("created_from")
                ));
            }
        }
    }
    crate::say!("{}\n", lines.join("\n"));
}

pub(super) fn rules_test(
    cfg: &Config,
    from: Option<String>,
    to: Option<String>,
    call: Option<String>,
    json_out: bool,
) -> anyhow::Result<u8> {
    let store = super::open_existing(cfg)?;
    let known: HashSet<String> = store
        .operator_map(Clock::system().now(), Duration::days(3650))?
        .into_keys()
        .collect();
    // The range searched, said whatever is found.
    let mut searched = String::new();
    let calls: Vec<(String, String)> = match call {
        Some(id) => {
            let id = id.strip_prefix("unitalk-").unwrap_or(&id).to_string();
            match store.stored_call(&id)? {
                Some(raw) => vec![(id, raw)],
                None => {
                    crate::redact::complain(&format!(
                        "ubsync: call {id} is not in the state file (a pass pulls it first; `ubsync show` finds calls by number)"
                    ));
                    return Ok(1);
                }
            }
        }
        None => {
            let tz = cfg.unitalk.timezone;
            let (start, end) = match (from, to) {
                (None, None) => {
                    // The day the last passes covered: the 24 hours before the cursor (or
                    // before now, before any pass).
                    let end = store
                        .cursor(crate::sync::HISTORY_STREAM)?
                        .unwrap_or_else(|| Clock::system().now());
                    (end - Duration::days(1), end)
                }
                (from, to) => {
                    let from_raw = from.unwrap_or_else(|| {
                        Clock::system()
                            .now()
                            .with_timezone(&tz)
                            .date_naive()
                            .to_string()
                    });
                    let to_raw = to.unwrap_or_else(|| from_raw.clone());
                    (
                        super::ranges::range_bound(cfg, "--from", &from_raw, false)?,
                        super::ranges::range_bound(cfg, "--to", &to_raw, true)?,
                    )
                }
            };
            searched = format!(
                " between {} and {} ({tz})",
                start.with_timezone(&tz).format("%Y-%m-%d %H:%M"),
                end.with_timezone(&tz).format("%Y-%m-%d %H:%M")
            );
            store.stored_calls(start, end, MAX_CALLS)?
        }
    };
    let decisions: Vec<Value> = calls
        .iter()
        .map(|(id, raw)| decide(cfg, &store, &known, id, raw))
        .collect();
    if json_out {
        crate::say!("{}", serde_json::to_string_pretty(&decisions)?);
        return Ok(0);
    }
    if decisions.is_empty() {
        crate::say!(
            "no stored calls{searched} (a pass pulls them first; --from/--to choose another range)"
        );
        return Ok(0);
    }
    for d in &decisions {
        print_block(d);
    }
    let count = |k: &str| decisions.iter().filter(|d| d["decision"] == k).count();
    crate::say!(
        "{} calls{searched}: {} pushed, {} skipped, {} quarantined, {} waiting (nothing was sent or written){}",
        decisions.len(),
        count("push"),
        count("skip"),
        count("quarantine"),
        count("wait"),
        if decisions.len() == MAX_CALLS {
            format!("; only the first {MAX_CALLS} shown, narrow the range")
        } else {
            String::new()
        }
    );
    Ok(0)
}
