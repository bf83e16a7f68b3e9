//! Probing calls whose outcome is unknown: looked up in Bitrix24 (statistics by
//! `EXTERNAL_CALL_ID`, activities by `ORIGIN_ID`, tasks) and continued from what is found.

use super::ledger::found_in_statistics;
use super::*;
use crate::bitrix24::api::{tasks::TaskRow, telephony::CallRecord};

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
                Mode::Telephony => api::telephony::statistic_of(key("p", &w.ledger.call_id), &ext),
                Mode::Activity => api::crm::activity_of(key("p", &w.ledger.call_id), &ext),
            });
        }
        if let Some(since) = w.ledger.task_in_flight_since.filter(|_| wants_task(w)) {
            commands.push(Command::new(
                key("q", &w.ledger.call_id),
                "tasks.task.list",
                task_probe_params(ctx, w.ledger.responsible_id, since, None),
            ));
        }
    }
    let found = lookup(ctx, commands).await?;
    // A task probe is complete only when every page was read: a task past the first 50 would
    // otherwise be created again.
    let mut task_lists: HashMap<String, Vec<TaskRow>> = HashMap::new();
    for w in &rows {
        if let Some(since) = w.ledger.task_in_flight_since.filter(|_| wants_task(w)) {
            let resp = w.ledger.responsible_id;
            let k = key("q", &w.ledger.call_id);
            let Some(first) = found.results.get(&k).filter(|v| v.is_object()) else {
                continue;
            };
            match all_task_pages(ctx, first, found.nexts.get(&k).copied(), resp, since).await {
                Ok(all) => {
                    task_lists.insert(k, all);
                }
                Err(e) => {
                    tracing::warn!(error = %e, call = %w.ledger.call_id, "a task probe could not be completed; trying again next pass");
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
            // Only a list proves anything: a failed lookup, or an answer of another shape,
            // leaves the call in flight for the next probe.
            let Some(res) = found
                .results
                .get(&key("p", &l.call_id))
                .and_then(Value::as_array)
            else {
                continue;
            };
            let hit = match ctx.cfg.bitrix24.mode {
                Mode::Telephony => res.first().cloned(),
                Mode::Activity => api::crm::activity_for(res, &ext).cloned(),
            };
            l.in_flight_since = None;
            match (hit, ctx.cfg.bitrix24.mode) {
                (Some(row), Mode::Telephony) => {
                    l = found_in_statistics(
                        l,
                        &CallRecord::decode(&row),
                        stored_facts(ctx, &known, &w.raw).and_then(|f| f.link),
                        now + secs(ctx.cfg.sync.record_check_after),
                    );
                }
                (Some(row), Mode::Activity) => {
                    l.b24_activity_id = api::crm::activity_id(&row);
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
            if let Some(tasks) = task_lists.get(&key("q", &l.call_id)) {
                l.task_id = tasks.iter().find(|t| t.is_for(&ext)).and_then(|t| t.id);
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
fn task_probe_params(
    ctx: &SyncCtx,
    responsible: Option<i64>,
    since: DateTime<Utc>,
    start: Option<u64>,
) -> Value {
    let from =
        crate::timezone::rfc3339_in(since - Duration::minutes(10), ctx.cfg.bitrix24.timezone);
    api::tasks::list_created_since(&from, responsible, start)
}

/// Most pages a task probe reads (50 tasks each) before it gives up for this pass.
const MAX_TASK_PAGES: u64 = 200;

/// Every task of a task probe: the first page's, then the pages after it. `Err` when the
/// listing could not be completed (the probe is then retried, never taken as "not found").
async fn all_task_pages(
    ctx: &SyncCtx,
    first: &Value,
    next: Option<u64>,
    responsible: Option<i64>,
    since: DateTime<Utc>,
) -> Result<Vec<TaskRow>, SyncError> {
    let mut all = api::tasks::listed_tasks(first);
    // Do not trust `next` alone: a full page means there may be more.
    let mut next = next.or((all.len() >= 50).then_some(all.len() as u64));
    let mut pages = 1;
    while let Some(start) = next {
        if pages >= MAX_TASK_PAGES {
            return Err(SyncError::Bitrix24(Bitrix24Error::Unavailable {
                detail: format!("more than {} matching tasks", MAX_TASK_PAGES * 50),
                outcome_unknown: false,
            }));
        }
        let params = task_probe_params(ctx, responsible, since, Some(start));
        let env = ctx.b24.call("tasks.task.list", params).await?;
        let page = api::tasks::listed_tasks(&env.result);
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
    Ok(all)
}
