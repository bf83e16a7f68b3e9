//! Commands over a date range: `backfill` (with progress in calls) and `reconcile` (a report,
//! repairs unless `--dry-run`, exit 3 unless the range is proven exact).

use super::*;

pub(super) fn range_bound(
    cfg: &Config,
    key: &str,
    raw: &str,
    end_of_day: bool,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let tz = cfg.unitalk.timezone;
    if let Ok(day) = chrono::NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d") {
        let day = if end_of_day {
            day.succ_opt().unwrap_or(day)
        } else {
            day
        };
        return Ok(crate::timezone::local_to_utc(
            day.and_hms_opt(0, 0, 0).expect("midnight"),
            tz,
        ));
    }
    crate::config::parse_start(raw, tz).ok_or_else(|| {
        anyhow::Error::new(UsageError(format!(
            "{key}: `{raw}` is not a date; write it as 2026-11-01, \"2026-11-01 08:00:00\" (Unitalk's zone) or RFC 3339"
        )))
    })
}

pub(super) async fn backfill(path: &std::path::Path, from: &str, to: &str) -> anyhow::Result<u8> {
    let cfg = load_config(path)?;
    let start = range_bound(&cfg, "--from", from, false)?;
    let end = range_bound(&cfg, "--to", to, true)?;
    if end <= start {
        anyhow::bail!(UsageError(
            "--to: is not after --from; give a later --to".into()
        ));
    }
    let _lock = crate::lock::StateLock::acquire(&cfg.state.path)?;
    let stream = format!("backfill:{}..{}", start.to_rfc3339(), end.to_rfc3339());
    // Messages give times in the account's zone, with its offset.
    let tz = cfg.unitalk.timezone;
    let store = Store::open(&cfg.state.path)?;
    let resumed = store.cursor(&stream)?;
    // On resume, the calls of the range read before count as done.
    let done_before = match resumed {
        Some(c) => {
            crate::say!(
                "backfill: resuming from {} (a previous run stopped there)",
                crate::timezone::rfc3339_in(c, tz)
            );
            store.calls_between(start, c)?
        }
        None => 0,
    };
    let ctx = context(cfg, SharedStore::new(store))?;
    cancel_on_signals(ctx.cancel.clone());
    // A cheap count of what is left (one request; Unitalk's `count` is only an estimate).
    let left = crate::sync::estimate_calls(&ctx, resumed.unwrap_or(start).max(start), end).await;
    let total = left.map(|n| n + done_before);
    if let Some(t) = total {
        crate::say!("backfill: about {t} calls in the range ({done_before} already done)");
    }
    let progress = progress::CallProgress::start(
        "backfill",
        total,
        done_before,
        ctx.cfg.bitrix24.per_second.get() as f64,
        true,
    );
    let opts = PassOptions {
        stream: stream.clone(),
        range: Some((start, end)),
        progress: Some(progress.callback()),
        ..Default::default()
    };
    let result = run_logged(&ctx, "backfill", &opts).await;
    progress.finish();
    if result.is_err() {
        // Ctrl-C or a failure: what was done so far, and how to go on.
        if let Some(p) = progress.latest() {
            crate::say!(
                "backfill: stopped after {} calls done ({} read), {} pushed, {} tasks; run the same command again to continue from {}",
                done_before + p.done,
                done_before + p.pulled,
                p.pushed,
                p.tasks,
                p.position.map(|c| crate::timezone::rfc3339_in(c, tz)).unwrap_or_else(|| crate::timezone::rfc3339_in(start, tz))
            );
        }
    }
    let summary = result?;
    let at = ctx.store.lock().cursor(&stream)?;
    crate::say!("backfill: {summary}");
    if at.is_some_and(|c| c >= end) {
        crate::say!(
            "backfill: complete up to {}",
            crate::timezone::rfc3339_in(end, tz)
        );
    } else {
        crate::say!(
            "backfill: stopped at {}; run the same command again to continue",
            at.map(|c| crate::timezone::rfc3339_in(c, tz))
                .unwrap_or_else(|| crate::timezone::rfc3339_in(start, tz))
        );
    }
    Ok(0)
}

pub(super) async fn reconcile(
    path: &std::path::Path,
    from: Option<String>,
    to: Option<String>,
    dry_run: bool,
) -> anyhow::Result<u8> {
    let cfg = load_config(path)?;
    let yesterday = (Clock::system().now().with_timezone(&cfg.unitalk.timezone)
        - chrono::Duration::days(1))
    .date_naive()
    .to_string();
    let from_raw = from.unwrap_or(yesterday);
    let to_raw = to.unwrap_or_else(|| from_raw.clone());
    let start = range_bound(&cfg, "--from", &from_raw, false)?;
    let end = range_bound(&cfg, "--to", &to_raw, true)?;
    let _lock = if dry_run {
        None
    } else {
        Some(crate::lock::StateLock::acquire(&cfg.state.path)?)
    };
    let reports = cfg
        .state
        .path
        .parent()
        .map(|p| p.join("reports"))
        .unwrap_or_else(|| PathBuf::from("reports"));
    let store = SharedStore::new(Store::open(&cfg.state.path)?);
    let ctx = context(cfg, store)?;
    cancel_on_signals(ctx.cancel.clone());
    let run_id = crate::sync::runlog::begin(&ctx, "reconcile");
    let result = crate::sync::reconcile::reconcile(&ctx, start, end, dry_run).await;
    crate::sync::runlog::finish_reconcile(&ctx, run_id, &result);
    let now = ctx.clock.now();
    let (report, summary) = result?;
    crate::redact::say(report.table().trim_end_matches('\n'));
    crate::store::files::create_private_dir(&reports)
        .with_context(|| format!("cannot create {}", reports.display()))?;
    let stem = format!(
        "reconcile-{}_{}-{}",
        from_raw.replace([' ', ':'], "-"),
        to_raw.replace([' ', ':'], "-"),
        now.format("%Y%m%dT%H%M%SZ")
    );
    let file = crate::store::files::write_new_private(
        &reports,
        &stem,
        &crate::redact::redact(&serde_json::to_string_pretty(&report)?),
    )
    .with_context(|| format!("cannot write a report in {}", reports.display()))?;
    crate::say!("report: {}", file.display());
    let repaired = !(report.repaired_calls.is_empty() && report.repaired_tasks.is_empty());
    if !dry_run && repaired {
        crate::say!("repair pass: {summary}");
    }
    crate::say!(
        "{}",
        match (report.consistent(), dry_run) {
            (true, _) => "Bitrix24 holds every call of the range exactly once".to_string(),
            (false, _) if !report.unknown.is_empty() => format!(
                "{} calls are unknown: Bitrix24 did not answer completely, so they were not repaired; run reconcile again later",
                report.unknown.len()
            ),
            (false, true) => "differences found; run without --dry-run to repair them".to_string(),
            (false, false) if !report.not_repaired.is_empty() => format!(
                "{} differences could not be repaired (see \"not repaired\", with why); the rest were",
                report.not_repaired.len()
            ),
            (false, false) if report.duplicated_in_bitrix24.is_empty() =>
                "differences repaired".to_string(),
            (false, false) =>
                "differences repaired; duplicates need a human (ubsync never deletes in the portal)"
                    .to_string(),
        }
    );
    // 0 only when the range is proven exact; 3 when differences remain for a human or a
    // later run (a dry run, duplicates, unknown ranges, calls that cannot be repaired).
    Ok(if report.proven() { 0 } else { EXIT_DIFFERENCES })
}
