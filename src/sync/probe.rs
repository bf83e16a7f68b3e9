//! Probing calls whose outcome is unknown: looked up in Bitrix24 (statistics by
//! `EXTERNAL_CALL_ID`, activities by `ORIGIN_ID`, tasks) and continued from what is found.

use super::*;

/// Settles calls whose last batch has an unknown outcome by asking Bitrix24 what it holds.
pub(super) async fn probe_in_flight(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let now = ctx.clock.now();
    // In-flight rows are due whatever their retry time.
    let rows: Vec<WorkItem> = ctx
        .store
        .lock()
        .work_due(now + Duration::days(36500))?
        .into_iter()
        .filter(|w| w.ledger.stage == Stage::InFlight || w.ledger.task_in_flight_since.is_some())
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    tracing::info!(
        calls = rows.len(),
        "probing Bitrix24 for calls whose last batch had an unknown outcome"
    );
    let known = known_lines(ctx)?;
    // Verify-first rows carry no responsible: only a missed call can have a task to find.
    let wants_task = |w: &WorkItem| {
        w.ledger.task_in_flight_since.is_some()
            && (w.ledger.responsible_id.is_some()
                || stored_facts(ctx, &known, &w.raw).is_some_and(|f| f.missed))
    };
    let mut commands = Vec::new();
    for w in &rows {
        let ext = format!("unitalk-{}", w.ledger.call_id);
        if w.ledger.stage == Stage::InFlight {
            commands.push(match ctx.cfg.bitrix24.mode {
                Mode::Telephony => Command::new(key("p", &w.ledger.call_id), "voximplant.statistic.get", json!({"FILTER": {"EXTERNAL_CALL_ID": ext}})),
                Mode::Activity => Command::new(
                    key("p", &w.ledger.call_id),
                    "crm.activity.list",
                    json!({"filter": {"ORIGINATOR_ID": "ubsync", "ORIGIN_ID": ext}, "select": ["ID", "OWNER_TYPE_ID", "OWNER_ID"]}),
                ),
            });
        }
        if let Some(since) = w.ledger.task_in_flight_since.filter(|_| wants_task(w)) {
            commands.push(Command::new(
                key("q", &w.ledger.call_id),
                "tasks.task.list",
                task_probe_params(ctx, w.ledger.responsible_id, since),
            ));
        }
    }
    let mut found = lookup(ctx, commands).await?;
    // A task probe is complete only when every page was read: a task past the first 50 would
    // otherwise be created again.
    for w in &rows {
        if let Some(since) = w.ledger.task_in_flight_since.filter(|_| wants_task(w)) {
            let resp = w.ledger.responsible_id;
            let k = key("q", &w.ledger.call_id);
            if !found.results.contains_key(&k) {
                continue;
            }
            match more_task_pages(ctx, &found, &k, resp, since).await {
                Ok(Some(all)) => {
                    found.results.insert(k, json!({"tasks": all}));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, call = %w.ledger.call_id, "a task probe could not be completed; trying again next pass");
                    found.results.remove(&k);
                }
            }
        }
    }
    let mut updated = Vec::new();
    let mut verified = Vec::new();
    for w in rows {
        let wants_task = wants_task(&w);
        let mut l = w.ledger.clone();
        let ext = format!("unitalk-{}", l.call_id);
        if l.stage == Stage::InFlight {
            let Some(res) = found.results.get(&key("p", &l.call_id)) else {
                continue; // the probe itself failed; try again next pass
            };
            let hit = res.as_array().and_then(|a| a.first()).cloned();
            l.in_flight_since = None;
            match (hit, ctx.cfg.bitrix24.mode) {
                (Some(row), Mode::Telephony) => {
                    l.b24_call_id = row.get("CALL_ID").and_then(as_text).or(l.b24_call_id);
                    l.b24_stat_id = row.get("ID").and_then(as_i64);
                    l.b24_activity_id = row.get("CRM_ACTIVITY_ID").and_then(as_i64);
                    if let (Some(k), Some(id)) = (
                        row.get("CRM_ENTITY_TYPE").and_then(as_text),
                        row.get("CRM_ENTITY_ID").and_then(as_i64),
                    ) {
                        l.crm_entity_type = Some(k);
                        l.crm_entity_id = Some(id);
                    }
                    // A file proves the recording; a URL alone is what finish was given (its
                    // download is checked later, see `record_check.rs`).
                    let has_file = record_check::has_file(&row);
                    let has_url = row.get("CALL_RECORD_URL").and_then(as_text).is_some();
                    if has_file || has_url {
                        let raw: Value = serde_json::from_str(&w.raw).unwrap_or(Value::Null);
                        l.record_url = raw.get("link").and_then(as_text);
                        l.record_check_at = (!has_file && l.record_url.is_some())
                            .then(|| now + secs(ctx.cfg.sync.record_check_after));
                    }
                    l.stage = Stage::Finished;
                }
                (Some(row), Mode::Activity) => {
                    l.b24_activity_id = row.get("ID").and_then(as_i64);
                    l.stage = Stage::Finished;
                }
                (None, _) => {
                    l.stage = if l.b24_call_id.is_some() {
                        Stage::Registered
                    } else {
                        Stage::Pending
                    }
                }
            }
            s.probed += 1;
            verified.push(l.call_id.clone());
        }
        if l.task_in_flight_since.is_some() && !wants_task {
            l.task_in_flight_since = None;
        } else if l.task_in_flight_since.is_some() {
            if let Some(Value::Object(res)) = found.results.get(&key("q", &l.call_id)) {
                let tasks = res
                    .get("tasks")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let mine = tasks.iter().find(|t| {
                    t.get("xmlId").and_then(as_text).as_deref() == Some(ext.as_str())
                        || t.get("description")
                            .and_then(Value::as_str)
                            .is_some_and(|d| d.contains(&ext))
                });
                l.task_id = mine.and_then(|t| t.get("id")).and_then(as_i64);
                l.task_in_flight_since = None;
                s.probed += 1;
            }
        }
        updated.push(l);
    }
    ctx.store.lock().apply(&updated, &[], None, now)?;
    ctx.store.lock().set_verified(&verified, now)?;
    // Rows settled as finished may have nothing left to do; the planner re-reads them.
    Ok(())
}

/// The task probe's request: the responsible user's tasks created since shortly before the
/// send, in a stable order so pages do not shift.
fn task_probe_params(ctx: &SyncCtx, responsible: Option<i64>, since: DateTime<Utc>) -> Value {
    let mut filter = json!({">=CREATED_DATE": crate::timezone::rfc3339_in(since - Duration::minutes(10), ctx.cfg.bitrix24.timezone)});
    if let Some(r) = responsible {
        filter["RESPONSIBLE_ID"] = json!(r);
    }
    json!({"filter": filter, "order": {"ID": "asc"}, "select": ["ID", "XML_ID", "DESCRIPTION"]})
}

/// Most pages a task probe reads (50 tasks each) before it gives up for this pass.
const MAX_TASK_PAGES: u64 = 200;

/// Reads the pages after the first of a task probe. `None` when the first page was all there
/// was; `Err` when the listing could not be completed (the probe is then retried, never taken
/// as "not found").
async fn more_task_pages(
    ctx: &SyncCtx,
    found: &BatchOutcome,
    k: &str,
    responsible: Option<i64>,
    since: DateTime<Utc>,
) -> Result<Option<Vec<Value>>, SyncError> {
    let page_tasks = |v: &Value| -> Vec<Value> {
        v.get("tasks")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let first = page_tasks(&found.results[k]);
    // Do not trust `next` alone: a full page means there may be more.
    let mut next = found
        .nexts
        .get(k)
        .copied()
        .or((first.len() >= 50).then_some(first.len() as u64));
    if next.is_none() {
        return Ok(None);
    }
    let mut all = first;
    let mut pages = 1;
    while let Some(start) = next {
        if pages >= MAX_TASK_PAGES {
            return Err(SyncError::Bitrix24(Bitrix24Error::Unavailable {
                detail: format!("more than {} matching tasks", MAX_TASK_PAGES * 50),
                outcome_unknown: false,
            }));
        }
        let mut params = task_probe_params(ctx, responsible, since);
        params["start"] = json!(start);
        let env = ctx.b24.call("tasks.task.list", params).await?;
        let page = page_tasks(&env.result);
        let n = page.len() as u64;
        let before = all.len();
        for t in page {
            if !all.contains(&t) {
                all.push(t);
            }
        }
        pages += 1;
        next = match env.next {
            Some(nx) if nx > start => Some(nx),
            _ if n >= 50 && all.len() > before => Some(start + n),
            _ => None,
        };
    }
    Ok(Some(all))
}
