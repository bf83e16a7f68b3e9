//! Verify-first: a lost, emptied or replaced state file is not a fresh portal. The first pass
//! over an empty ledger sets `ledger.verify_before`; every call that started before it is
//! looked up in Bitrix24 before its first registration (listed by date; held ones continue from
//! their record, the rest are probed; in telephony mode a complete listing also proves absence,
//! in activity mode only the probe by `ORIGIN_ID` does).

use super::*;

pub(super) fn verify_policy(ctx: &SyncCtx, now: DateTime<Utc>) -> Result<(), SyncError> {
    let store = ctx.store.lock();
    if store.fact(FACT_VERIFY_BEFORE)?.is_some() {
        return Ok(());
    }
    let before = if store.ledger_is_empty()? {
        tracing::info!(before = %now, "a fresh state file: calls that started before now are looked up in Bitrix24 before they are registered, so an earlier state's pushes are never repeated");
        now
    } else {
        DateTime::<Utc>::UNIX_EPOCH
    };
    store.set_fact(FACT_VERIFY_BEFORE, &crate::store::ts(before), now)?;
    Ok(())
}

/// Verify-first, the cheap part: lists what Bitrix24 holds over the range of the calls still to
/// verify (statistics or ubsync's activities by date, 50 pages a request). When the listing is
/// complete, a call it does not hold was never pushed (a task comes only after its call), so in
/// telephony mode it is verified at once (in activity mode it is probed); a call it holds once continues from its listed record (its ids, its
/// recording: a file, or a URL to check), so only a missed call's task is still looked up.
/// Calls held twice, and every call when the listing is incomplete, are probed one by one.
pub(super) async fn verify_by_listing(
    ctx: &SyncCtx,
    before: DateTime<Utc>,
    s: &mut PassSummary,
) -> Result<(), SyncError> {
    let pending = ctx.store.lock().unverified(before)?;
    let (Some(first), Some(last)) = (pending.first(), pending.last()) else {
        return Ok(());
    };
    let (from, to) = (first.1, last.1 + Duration::seconds(1));
    let (listed, complete) = reconcile::listed_in_bitrix24(ctx, from, to).await?;
    if !complete {
        return Ok(());
    }
    let now = ctx.clock.now();
    // Absence from a listing by date proves a call was never pushed only where the portal's
    // date filter is trusted: the statistics' `CALL_START_DATE`. Activities are listed by the
    // `START_TIME` ubsync wrote, which portals (and their fakes) have been seen to compare in
    // another zone or not at all, so in activity mode a call the listing does not hold is looked
    // up by its `ORIGIN_ID` (the probe, 50 a request), unless the portal holds no activity of
    // ubsync's at all (a fresh install: one request proves it).
    let unlisted = || {
        pending
            .iter()
            .map(|(id, _)| id.clone())
            .filter(|id| !listed.contains_key(id))
            .collect::<Vec<String>>()
    };
    let absent: Vec<String> = match ctx.cfg.bitrix24.mode {
        Mode::Telephony => unlisted(),
        Mode::Activity if listed.is_empty() && holds_no_activity_of_ours(ctx).await? => unlisted(),
        Mode::Activity => Vec::new(),
    };
    if !absent.is_empty() {
        tracing::info!(calls = absent.len(), held = listed.len(), "Bitrix24 holds none of these calls (listed by date): they are pushed without a lookup each");
        s.verified += absent.len() as u64;
        ctx.store.lock().set_verified(&absent, now)?;
    }
    let once: HashSet<&str> = pending
        .iter()
        .filter(|(id, _)| listed.get(id).is_some_and(|r| r.len() == 1))
        .map(|(id, _)| id.as_str())
        .collect();
    if once.is_empty() {
        return Ok(());
    }
    let known = known_lines(ctx)?;
    let items = ctx.store.lock().work_due(now + Duration::days(36500))?;
    let mut rows = Vec::new();
    for w in items
        .iter()
        .filter(|w| once.contains(w.ledger.call_id.as_str()))
    {
        let rec = &listed[&w.ledger.call_id][0];
        let f = stored_facts(ctx, &known, &w.raw);
        let mut l = match ctx.cfg.bitrix24.mode {
            Mode::Telephony => ledger::found_in_statistics(
                w.ledger.clone(),
                rec,
                f.as_ref().and_then(|f| f.link.clone()),
                now + secs(ctx.cfg.sync.record_check_after),
            ),
            Mode::Activity => LedgerRow {
                b24_activity_id: rec.activity_id,
                stage: Stage::Finished,
                ..w.ledger.clone()
            },
        };
        // A missed call may have its task already: the probe looks for it before one is added.
        if f.as_ref().is_some_and(|f| f.missed) && ctx.cfg.tasks.enabled {
            l.task_in_flight_since = Some(w.started_at);
        }
        rows.push(l);
    }
    let ids: Vec<String> = rows.iter().map(|l| l.call_id.clone()).collect();
    tracing::info!(
        calls = ids.len(),
        "Bitrix24 holds these calls once (listed by date): each continues from its record"
    );
    s.verified += ids.len() as u64;
    ctx.store.lock().apply(&rows, &[], None, now)?;
    ctx.store.lock().set_verified(&ids, now)?;
    Ok(())
}

/// Whether the portal answers that it holds no activity of ubsync's at all, whatever its time.
/// Anything else (a row, an error, an answer of another shape) proves nothing.
async fn holds_no_activity_of_ours(ctx: &SyncCtx) -> Result<bool, SyncError> {
    let any = Command::new("any", "crm.activity.list", api::crm::any_activity_of_ours());
    let out = match lookup(ctx, vec![any]).await {
        Ok(out) => out,
        Err(SyncError::Bitrix24(e)) if e.is_retryable() => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(out
        .results
        .get("any")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty))
}

/// The lookups a pass makes before sending (verify-first after a lost state, probes of calls
/// whose outcome is unknown), as a dry run's plan lines `lookup call ID: …`.
pub(super) fn dry_run_lookups(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let method = match ctx.cfg.bitrix24.mode {
        Mode::Telephony => "voximplant.statistic.get by EXTERNAL_CALL_ID",
        Mode::Activity => "crm.activity.list by ORIGIN_ID",
    };
    let store = ctx.store.lock();
    let mut ids = HashSet::new();
    let before = store
        .fact(FACT_VERIFY_BEFORE)?
        .as_deref()
        .and_then(crate::store::parse_ts);
    if let Some(before) = before {
        for (id, _) in store.unverified(before)? {
            s.plan.push(format!(
                "lookup call {id}: it started before this state file began, so Bitrix24 is asked first (a listing by date, then {method} where that proves nothing); the plan below follows the answer"
            ));
            ids.insert(id);
        }
    }
    for w in store.work_due(ctx.clock.now() + Duration::days(36500))? {
        let id = &w.ledger.call_id;
        if ids.contains(id) {
            continue;
        }
        if w.ledger.stage == Stage::InFlight {
            s.plan.push(format!(
                "lookup call {id}: its last batch had an unknown outcome ({method})"
            ));
            ids.insert(id.clone());
        } else if w.ledger.task_in_flight_since.is_some() {
            s.plan.push(format!(
                "lookup call {id}: its task's creation had an unknown outcome (tasks.task.list)"
            ));
            ids.insert(id.clone());
        }
    }
    Ok(())
}
