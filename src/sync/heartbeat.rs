//! Proof that Bitrix24 answers even while nothing is due (`PassOptions::heartbeat`): the fact
//! `bitrix24.last_contact`, and one cheap authenticated request when it grows old.

use super::*;

/// Keeps proof that Bitrix24 answers even while nothing is due: a pass that got no answer from
/// it makes one cheap authenticated request (`user.current`) once half of `health.max_age` has
/// passed since the last answer, so an unreachable portal or a revoked token shows (as a failed
/// pass, exit 4 past `max_age`) before the health limit, not at the next call.
pub(super) async fn heartbeat(ctx: &SyncCtx, spoke: bool) -> Result<(), SyncError> {
    let now = ctx.clock.now();
    if !spoke {
        let last = ctx
            .store
            .lock()
            .fact(crate::store::runs::LAST_CONTACT)?
            .as_deref()
            .and_then(crate::store::parse_ts);
        let half = secs(ctx.cfg.health_max_age) / 2;
        if last.is_some_and(|t| t <= now && now - t < half) {
            return Ok(());
        }
        ctx.b24.call("user.current", serde_json::json!({})).await?;
    }
    ctx.store.lock().set_fact(
        crate::store::runs::LAST_CONTACT,
        &crate::store::ts(now),
        now,
    )?;
    Ok(())
}
