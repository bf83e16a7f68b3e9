//! Missed-call notifications (`[rules.notify]`): the task's responsible and the supervisors
//! get an `im.notify.personal.add`, at most one per client per `per_client`. Each decision is
//! recorded before anything is sent (at most once: a lost answer never notifies twice), and
//! each message carries a `TAG` of its call, so a portal that did get it replaces rather than
//! repeats it.

use super::*;

/// Notifies the missed calls that got a task since the last pass.
pub(super) async fn notify_missed(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    let n = &cfg.rules.notify;
    if !n.missed || !cfg.tasks.enabled {
        return Ok(());
    }
    let now = ctx.clock.now();
    let known = known_lines(ctx)?;
    let due = ctx.store.lock().to_notify(now - n.max_age)?;
    if due.is_empty() {
        return Ok(());
    }
    let tz = cfg.bitrix24.timezone;
    let mut decided = Vec::new();
    let mut clients: Vec<String> = Vec::new();
    let mut commands = Vec::new();
    for item in due {
        let l = &item.ledger;
        let client = l.client.clone().unwrap_or_default();
        let Some(f) = stored_facts(ctx, &known, &item.raw) else {
            decided.push((l.call_id.clone(), false));
            continue;
        };
        let recent = clients.contains(&client)
            || ctx
                .store
                .lock()
                .last_notified(&client)?
                .is_some_and(|t| now - t < n.per_client);
        if recent {
            decided.push((l.call_id.clone(), false));
            continue;
        }
        let message = n.message.render(&crate::rules::values(
            &f,
            tz,
            f.operator_line.as_deref(),
            None,
        ));
        let mut to: Vec<i64> = l.responsible_id.into_iter().collect();
        for u in &n.supervisors {
            if !to.contains(u) {
                to.push(*u);
            }
        }
        for u in to {
            commands.push(api::users::notify(
                format!("n{}", commands.len()),
                u,
                &message,
                Some(format!("UBSYNC_MISSED_{}_{u}", f.id)),
            ));
        }
        decided.push((l.call_id.clone(), true));
        clients.push(client);
    }
    if opts.dry_run {
        s.plan
            .extend(commands.iter().map(|c| format!("notify: {}", c.encode())));
        return Ok(());
    }
    ctx.store.lock().mark_notified(&decided, &clients, now)?;
    if commands.is_empty() {
        return Ok(());
    }
    match write_untracked(ctx, commands).await {
        Ok(out) => {
            s.notifications += out.results.len() as u64;
            for (k, e) in &out.errors {
                tracing::warn!(notification = %k, error = %e.description, "a missed-call notification was refused");
            }
        }
        // A notification is not worth a pass: it is given up, never sent twice.
        Err(e) if survivable(&e) => {
            tracing::warn!(error = %e, "missed-call notifications could not be sent; they are given up");
            s.faults_survived += 1;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
