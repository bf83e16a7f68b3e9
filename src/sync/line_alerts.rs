//! Line alerts (`[rules.lines] alert_after`): supervisors hear when an inner line has been
//! offline that long (inside working hours, when they are set) and when it is back. Driven only
//! by the stored status, which only a newer observation replaces, and by how long it has held,
//! so a line that flaps never stays offline long enough to alert. Each alert is recorded before
//! it is sent (at most once).

use super::*;

/// Sends the line alerts that are due.
pub async fn alert_lines(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let rules = &ctx.cfg.rules;
    let Some(after) = rules.lines.alert_after else {
        return Ok(());
    };
    let now = ctx.clock.now();
    let open = rules.hours.as_ref().is_none_or(|h| h.is_open(now));
    // A status not seen for a while says nothing about now.
    let fresh = now - after.max(Duration::minutes(15));
    let tz = ctx.cfg.bitrix24.timezone;
    let mut messages = Vec::new();
    {
        let store = ctx.store.lock();
        for l in store.lines()? {
            let (Some(status), Some(since), Some(seen)) =
                (&l.status, l.status_since, l.observed_at)
            else {
                continue;
            };
            let who = l
                .operator
                .as_deref()
                .map(|o| format!(" ({o})"))
                .unwrap_or_default();
            let offline = rules.lines.is_offline(status);
            if offline && !l.alerted && open && seen >= fresh && now - since >= after {
                messages.push(format!(
                    "Inner line {}{who} has been {} since {}",
                    l.line,
                    status.to_lowercase(),
                    since.with_timezone(&tz).format("%H:%M")
                ));
                store.set_line_alerted(&l.line, true)?;
            } else if !offline && l.alerted {
                messages.push(format!(
                    "Inner line {}{who} is back ({})",
                    l.line,
                    status.to_lowercase()
                ));
                store.set_line_alerted(&l.line, false)?;
            }
        }
    }
    if messages.is_empty() {
        return Ok(());
    }
    let mut commands = Vec::new();
    for m in &messages {
        tracing::info!("{m}");
        for u in &rules.lines.supervisors {
            commands.push(api::users::notify(
                format!("la{}", commands.len()),
                *u,
                m,
                None,
            ));
        }
    }
    match write_untracked(ctx, commands).await {
        Ok(out) => s.notifications += out.results.len() as u64,
        Err(e) if survivable(&e) => {
            tracing::warn!(error = %e, "line alerts could not be sent; they are given up");
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
