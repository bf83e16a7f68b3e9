//! Execute: the only code that writes to Bitrix24. `send_plans` marks calls in flight, sends
//! their batches and records every outcome in one transaction per batch; `send` retries only
//! what certainly did not run; `lookup` repeats reads whose answer was lost; `write_untracked`
//! sends writes the ledger does not track (leads, notifications, cancelled clicks).

use super::*;

/// Sends a batch. Rate limits are waited out inside the client; here a refused connection (the
/// request certainly did not execute) is retried with growing delays. An outcome-unknown failure
/// is returned at once: it must be probed, not re-sent. Cancellation abandons the request in
/// flight; its calls stay marked in flight and the next pass probes them.
pub(super) async fn send(ctx: &SyncCtx, commands: &[Command]) -> Result<BatchOutcome, SyncError> {
    let mut attempt = 0;
    loop {
        let result = tokio::select! {
            r = ctx.b24.batch(commands, false) => r,
            _ = ctx.cancel.cancelled() => return Err(SyncError::Cancelled),
        };
        match result {
            Ok(out) => return Ok(out),
            Err(
                e @ Bitrix24Error::Unavailable {
                    outcome_unknown: false,
                    ..
                },
            ) if attempt < 5 => {
                let delay = ctx.b24.backoff(attempt);
                tracing::warn!(error = %e, attempt, "batch not delivered; retrying");
                ctx.b24
                    .stats
                    .retried
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.cancel.cancelled() => return Err(SyncError::Cancelled),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends writes that are not tracked in the ledger (leads) in batches of 50: a lost answer is
/// an error, never a second send (the next pass's lookup finds what was created).
pub(super) async fn write_untracked(
    ctx: &SyncCtx,
    commands: Vec<Command>,
) -> Result<BatchOutcome, SyncError> {
    let mut all = BatchOutcome::default();
    for chunk in commands.chunks(crate::bitrix24::batch::MAX_COMMANDS) {
        let out = send(ctx, chunk).await?;
        all.results.extend(out.results);
        all.errors.extend(out.errors);
    }
    Ok(all)
}

/// Sends lookups (read-only commands) in batches of 50 and merges their outcomes. Only reads:
/// one whose answer was lost is asked again.
pub(super) async fn lookup(
    ctx: &SyncCtx,
    commands: Vec<Command>,
) -> Result<BatchOutcome, SyncError> {
    let mut all = BatchOutcome::default();
    for chunk in commands.chunks(crate::bitrix24::batch::MAX_COMMANDS) {
        // Lookups only read: one whose answer was lost is simply asked again.
        let mut lost = 0;
        let out = loop {
            match send(ctx, chunk).await {
                Err(SyncError::Bitrix24(e)) if e.outcome_unknown() && lost < 3 => {
                    tracing::warn!(error = %e, "a lookup's answer was lost; asking again");
                    ctx.b24
                        .stats
                        .retried
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let delay = ctx.b24.backoff(lost);
                    lost += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = ctx.cancel.cancelled() => return Err(SyncError::Cancelled),
                    }
                }
                r => break r?,
            }
        };
        all.results.extend(out.results);
        all.errors.extend(out.errors);
        all.totals.extend(out.totals);
        all.nexts.extend(out.nexts);
        all.times.extend(out.times);
    }
    Ok(all)
}

/// Notes in the summary that Bitrix24 paused `method` (429) until `until`.
pub(super) fn note_paused(s: &mut PassSummary, method: &str, until: DateTime<Utc>) {
    let note = format!("{method} until {}", until.format("%H:%M:%S UTC"));
    if !s.paused.contains(&note) {
        s.paused.push(note);
    }
}

/// Whether a failed request is one a pass can go on after: the portal may be back a moment later.
pub(super) fn survivable(e: &SyncError) -> bool {
    matches!(
        e,
        SyncError::Bitrix24(Bitrix24Error::Unavailable { .. } | Bitrix24Error::RateLimited)
    )
}

pub(super) fn describe_plan(p: &CallPlan) -> Vec<String> {
    p.commands
        .iter()
        .map(|c| format!("call {}: {}", p.call_id, c.encode()))
        .collect()
}

/// Sends planned batches: marks their calls in flight, sends, and records each call's outcome
/// with `record`, all of one batch in one transaction. Plans that use a method the portal paused
/// (429) wait for a later pass; an error an admin must fix stops the pass after recording.
pub(super) async fn send_plans(
    ctx: &SyncCtx,
    chains: Vec<super::push_plan::Chain>,
    mut record: impl FnMut(&str, LedgerRow, &BatchOutcome) -> (LedgerRow, Option<String>),
    s: &mut PassSummary,
) -> Result<(), SyncError> {
    let by_id: HashMap<String, (LedgerRow, bool)> = chains
        .iter()
        .map(|c| (c.plan.call_id.clone(), (c.row.clone(), c.non_idempotent)))
        .collect();
    for batch in plan::pack(chains.into_iter().map(|c| c.plan).collect()) {
        if ctx.cancel.is_cancelled() {
            return Err(SyncError::Cancelled);
        }
        let now = ctx.clock.now();
        let (batch, held): (Vec<CallPlan>, Vec<CallPlan>) = batch.into_iter().partition(|p| {
            p.commands
                .iter()
                .all(|c| ctx.b24.operating.paused_until(&c.method, now).is_none())
        });
        for p in &held {
            for c in &p.commands {
                if let Some(until) = ctx.b24.operating.paused_until(&c.method, now) {
                    note_paused(s, &c.method, until);
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Some(until) = ctx.b24.operating.paused_until("batch", now) {
            // The portal bills whole batches to `batch`: nothing can be sent until it resets.
            note_paused(s, "batch", until);
            return Ok(());
        }
        let originals: Vec<LedgerRow> = batch.iter().map(|p| by_id[&p.call_id].0.clone()).collect();
        let marked: Vec<LedgerRow> = batch
            .iter()
            .map(|p| {
                let (mut l, non_idempotent) = by_id[&p.call_id].clone();
                if non_idempotent {
                    l.in_flight_since = Some(now);
                    if matches!(l.stage, Stage::Pending | Stage::Registered) {
                        l.stage = Stage::InFlight;
                    }
                }
                l
            })
            .collect();
        ctx.store.lock().apply(&marked, &[], None, now)?;
        let commands: Vec<Command> = batch
            .iter()
            .flat_map(|p| p.commands.iter().cloned())
            .collect();
        let out = match send(ctx, &commands).await {
            Ok(out) => {
                s.failure_streak = 0;
                out
            }
            Err(e) => {
                let unknown = matches!(&e, SyncError::Bitrix24(b) if b.outcome_unknown())
                    || matches!(e, SyncError::Cancelled);
                if !unknown {
                    // Nothing was executed: put the rows back as they were.
                    ctx.store
                        .lock()
                        .apply(&originals, &[], None, ctx.clock.now())?;
                }
                if survivable(&e) && s.failure_streak < ctx.cfg.sync.max_consecutive_failures {
                    // The calls stay in flight (probed before anything is sent again) or
                    // pending; the next push round of this pass takes them up.
                    s.failure_streak += 1;
                    s.faults_survived += 1;
                    tracing::warn!(error = %e, streak = s.failure_streak, outcome_unknown = unknown, "a batch failed; what may have run is looked up before it is sent again");
                    continue;
                }
                return Err(e);
            }
        };
        let now = ctx.clock.now();
        let mut rows = Vec::new();
        let mut quarantine = Vec::new();
        let mut reached = 0;
        for ((p, original), marked) in batch.iter().zip(originals).zip(marked) {
            // The batch answered, but without this call's results: its outcome is unknown, so
            // it stays in flight and is probed, never re-sent as if it had not run.
            if p.commands
                .iter()
                .any(|c| !out.results.contains_key(&c.key) && !out.errors.contains_key(&c.key))
            {
                tracing::warn!(call = %p.call_id, "the batch's answer has no result for this call; it will be looked up in Bitrix24");
                rows.push(marked);
                continue;
            }
            let before = original.stage;
            let (row, reason) = record(&p.call_id, original, &out);
            if matches!(row.stage, Stage::Finished | Stage::Done)
                && !matches!(before, Stage::Finished | Stage::Done)
            {
                reached += 1;
            }
            if let Some(reason) = reason {
                s.quarantined += 1;
                quarantine.push(NewQuarantine {
                    source: "bitrix24",
                    call_id: Some(p.call_id.clone()),
                    raw: p
                        .commands
                        .iter()
                        .map(Command::encode)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    reason,
                });
            }
            rows.push(row);
        }
        ctx.store.lock().apply(&rows, &quarantine, None, now)?;
        s.pushed_so_far += reached;
        s.tell_progress();
        // Methods the portal paused (429) in this batch: their calls wait for a later pass.
        for c in &commands {
            if let Some(until) = ctx.b24.operating.paused_until(&c.method, now) {
                note_paused(s, &c.method, until);
            }
        }
        if let Some(e) = out
            .errors
            .values()
            .find(|e| plan::is_fatal_code(&e.effective_code()))
        {
            let code = e.effective_code();
            return Err(Bitrix24Error::Auth {
                hint: crate::bitrix24::auth_hint(&code)
                    .unwrap_or("check the application's or webhook's rights in the portal")
                    .into(),
                code,
                description: e.description.clone(),
            }
            .into());
        }
    }
    Ok(())
}

/// Quarantines calls the script refused (their reason is the script's message).
pub(super) fn settle_script_errors(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    failed: Vec<(Due, String)>,
    now: DateTime<Utc>,
) -> Result<(), SyncError> {
    let mut q = push_plan::PushPlan::default();
    for (d, reason) in failed {
        q.refuse_script(&d, reason);
    }
    settle_quarantines(ctx, opts, s, q.quarantines, now)
}

/// Quarantines calls no Bitrix24 user can take.
pub(super) fn settle_unassigned(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    unassigned: Vec<Due>,
    now: DateTime<Utc>,
) -> Result<(), SyncError> {
    let mut q = push_plan::PushPlan::default();
    for d in &unassigned {
        q.refuse_no_user(d);
    }
    settle_quarantines(ctx, opts, s, q.quarantines, now)
}

/// Writes a plan's quarantines (their rows and entries) in one transaction; a dry run lists
/// them instead.
pub(super) fn settle_quarantines(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    quarantines: Vec<(LedgerRow, NewQuarantine)>,
    now: DateTime<Utc>,
) -> Result<(), SyncError> {
    if quarantines.is_empty() {
        return Ok(());
    }
    if opts.dry_run {
        s.plan.extend(quarantines.iter().map(|(l, q)| {
            format!(
                "call {}: would be quarantined, nothing sent: {}",
                l.call_id, q.reason
            )
        }));
        return Ok(());
    }
    for (l, q) in &quarantines {
        tracing::warn!(call = %l.call_id, reason = %q.reason, "call quarantined, nothing sent");
    }
    let (rows, entries): (Vec<LedgerRow>, Vec<NewQuarantine>) = quarantines.into_iter().unzip();
    s.quarantined += entries.len() as u64;
    ctx.store.lock().apply(&rows, &entries, None, now)?;
    Ok(())
}
