//! `sync [--dry-run]` and `retry`: one pass each, logged in the store's run log.

use super::*;

/// Runs one pass and records it in the run log.
pub(super) async fn run_logged(
    ctx: &SyncCtx,
    job: &str,
    opts: &PassOptions,
) -> anyhow::Result<crate::sync::PassSummary> {
    let run_id = crate::sync::runlog::begin(ctx, job);
    let (summary, result) = crate::sync::run_pass_partial(ctx, opts).await;
    crate::sync::runlog::finish_pass(ctx, run_id, &summary, &result);
    if let Err(e) = result {
        if summary.done() + summary.leads + summary.tasks > 0 {
            crate::say!("{job}: stopped ({e}); done before that: {summary}");
        }
        return Err(e.into());
    }
    Ok(summary)
}

pub(super) async fn sync(path: &std::path::Path, dry_run: bool) -> anyhow::Result<u8> {
    let cfg = load_config(path)?;
    // A dry run only reads a snapshot; everything else is one writer at a time.
    let _lock = if dry_run {
        None
    } else {
        Some(crate::lock::StateLock::acquire(&cfg.state.path)?)
    };
    let store = Store::open(&cfg.state.path)?;
    if dry_run {
        // The pipeline plans on an in-memory copy of the state, but the Bitrix24 client keeps
        // the real store: a refreshed token pair must be stored for good (the portal voids the
        // old one at once).
        let scratch = store.in_memory_copy()?;
        let real = SharedStore::new(store);
        let mut ctx = context(cfg, SharedStore::new(scratch))?;
        ctx.b24 = Bitrix24Client::new(&ctx.cfg.bitrix24, real, ctx.clock.clone())?
            .without_keeping_the_bucket();
        let result = run_pass(
            &ctx,
            &PassOptions {
                dry_run: true,
                ..Default::default()
            },
        )
        .await;
        drop(ctx);
        let summary = result?;
        for line in &summary.plan {
            crate::say!("{line}");
        }
        let lookups = summary
            .plan
            .iter()
            .filter(|l| l.starts_with("lookup "))
            .count();
        crate::say!(
            "dry run: {} commands planned after {lookups} lookups (reads only), nothing written to Bitrix24; {}",
            summary.plan.len() - lookups,
            summary
        );
        return Ok(0);
    }
    let ctx = context(cfg, SharedStore::new(store))?;
    cancel_on_signals(ctx.cancel.clone());
    // On a terminal, a large backlog shows the same bar as a backfill (a timer run shows none).
    let mut opts = PassOptions {
        heartbeat: true,
        ..PassOptions::default()
    };
    let progress = {
        use std::io::IsTerminal as _;
        if std::io::stderr().is_terminal() {
            let cursor = ctx.store.lock().cursor(crate::sync::HISTORY_STREAM)?;
            let now = ctx.clock.now();
            let from = cursor.unwrap_or(now - chrono::Duration::days(1));
            let total = crate::sync::estimate_calls(&ctx, from, now).await;
            let p = progress::CallProgress::start(
                "sync",
                total,
                0,
                ctx.cfg.bitrix24.per_second.get() as f64,
                false,
            );
            opts.progress = Some(p.callback());
            Some(p)
        } else {
            None
        }
    };
    let result = run_logged(&ctx, "sync", &opts).await;
    if let Some(p) = &progress {
        p.finish();
    }
    let summary = result?;
    crate::say!("sync: {summary}");
    Ok(0)
}

pub(super) async fn retry(path: &std::path::Path, ids: &[String], all: bool) -> anyhow::Result<u8> {
    let cfg = load_config(path)?;
    let _lock = crate::lock::StateLock::acquire(&cfg.state.path)?;
    let mut store = Store::open(&cfg.state.path)?;
    let now = Clock::system().now();
    let tz = cfg.unitalk.timezone;
    let entries: Vec<_> = store
        .quarantined()?
        .into_iter()
        .filter(|q| all || q.call_id.as_ref().is_some_and(|c| ids.contains(c)))
        .collect();
    if entries.is_empty() {
        crate::say!("retry: no quarantined calls match");
        return Ok(if all { 0 } else { 1 });
    }
    // The cause may have been fixed in the portal (a user given the missing extension).
    store.forget_unmatched_operators()?;
    let mut released = 0;
    for q in &entries {
        if q.source == "unitalk"
            && store
                .ledger_row(q.call_id.as_deref().unwrap_or(""))?
                .is_none()
        {
            // An unreadable record: read it again; it enters the pipeline only if it now parses.
            let raw: serde_json::Value =
                serde_json::from_str(&q.raw).unwrap_or(serde_json::Value::Null);
            match crate::unitalk::wire::parse_call_as(&raw, tz, &cfg.unitalk.call_id_field) {
                Ok(call) => {
                    store.observe(
                        &[crate::store::ledger::Observation {
                            call_id: call.id.clone(),
                            started_at: call.started_at,
                            content_hash: crate::sync::call::content_hash(&call),
                            raw: q.raw.clone(),
                        }],
                        now,
                    )?;
                }
                Err(e) => {
                    crate::say!("retry: entry {} is still unreadable: {}", q.id, e.reason);
                    continue;
                }
            }
        }
        store.release(q.id, now)?;
        released += 1;
    }
    crate::say!(
        "retry: released {released} of {} quarantined entries; running a pass",
        entries.len()
    );
    let ctx = context(cfg, SharedStore::new(store))?;
    cancel_on_signals(ctx.cancel.clone());
    let summary = run_logged(&ctx, "retry", &PassOptions::default()).await?;
    crate::say!("sync: {summary}");
    let still: Vec<_> = ctx
        .store
        .lock()
        .quarantined()?
        .into_iter()
        .filter(|q| entries.iter().any(|e| e.call_id == q.call_id))
        .collect();
    for q in &still {
        crate::say!(
            "still quarantined: call {} — {}",
            q.call_id.as_deref().unwrap_or("?"),
            q.reason
        );
    }
    Ok(0)
}
