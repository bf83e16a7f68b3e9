//! The run log's one writer. Every job, from the command line or the daemon, begins and
//! finishes its run here, so a run's outcome is the same whoever started it and matches the
//! exit code the command line gives for it: `ok` (0), `differences` (a reconcile that exits 3),
//! `interrupted` (cancelled, 75), `failed` (anything else). What is stored is what happened: a
//! pass's summary, a reconcile's findings and repairs with its repair pass.

use serde::{Deserialize, Serialize};

use super::reconcile::ReconcileReport;
use super::{PassSummary, SyncCtx, SyncError};

/// A reconcile as the run log keeps it: counts of what it found and did, and its repair pass.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReconcileRun {
    pub dry_run: bool,
    pub in_unitalk: usize,
    pub missing_from_bitrix24: usize,
    pub duplicated_in_bitrix24: usize,
    pub tasks_missing: usize,
    pub unknown: usize,
    pub not_repairable: usize,
    pub repaired_calls: usize,
    pub repaired_tasks: usize,
    pub not_repaired: usize,
    pub repair: PassSummary,
}

impl ReconcileRun {
    pub fn of(report: &ReconcileReport, repair: &PassSummary) -> Self {
        Self {
            dry_run: report.dry_run,
            in_unitalk: report.in_unitalk.len(),
            missing_from_bitrix24: report.missing_from_bitrix24.len(),
            duplicated_in_bitrix24: report.duplicated_in_bitrix24.len(),
            tasks_missing: report.tasks_missing.len(),
            unknown: report.unknown.len(),
            not_repairable: report.not_repairable.len(),
            repaired_calls: report.repaired_calls.len(),
            repaired_tasks: report.repaired_tasks.len(),
            not_repaired: report.not_repaired.len(),
            repair: repair.clone(),
        }
    }
}

impl std::fmt::Display for ReconcileRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "reconcile of {} calls: {} missing from Bitrix24, {} duplicated, {} tasks missing, {} unknown, {} not repairable",
            self.in_unitalk,
            self.missing_from_bitrix24,
            self.duplicated_in_bitrix24,
            self.tasks_missing,
            self.unknown,
            self.not_repairable
        )?;
        if self.dry_run {
            return write!(f, " (dry run: nothing repaired)");
        }
        write!(
            f,
            "; repaired {} calls and {} tasks",
            self.repaired_calls, self.repaired_tasks
        )?;
        if self.not_repaired > 0 {
            write!(f, ", {} not repaired", self.not_repaired)?;
        }
        if self.repaired_calls + self.repaired_tasks + self.not_repaired > 0 {
            write!(f, " (repair pass: {})", self.repair)?;
        }
        Ok(())
    }
}

/// A run's outcome for an error: a cancelled run was interrupted, any other failed.
pub fn failure(e: &SyncError) -> &'static str {
    if matches!(e, SyncError::Cancelled) {
        "interrupted"
    } else {
        "failed"
    }
}

/// Begins a run of `job`; `None` (logged) when the run log cannot be written.
pub fn begin(ctx: &SyncCtx, job: &str) -> Option<i64> {
    match ctx.store.lock().begin_run(job, ctx.clock.now()) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(error = %e, job, "cannot record the run in the run log");
            None
        }
    }
}

fn finish(
    ctx: &SyncCtx,
    id: Option<i64>,
    outcome: &str,
    summary: Option<serde_json::Value>,
    error: Option<String>,
) {
    let Some(id) = id else { return };
    if let Err(e) = ctx.store.lock().finish_run(
        id,
        ctx.clock.now(),
        outcome,
        summary.as_ref(),
        error.as_deref(),
    ) {
        tracing::warn!(error = %e, "cannot record the run's outcome in the run log");
    }
}

/// Finishes a pass's run (`sync`, `retry`, `backfill`, `events`) with what it did, also when it
/// failed or was interrupted part way.
pub fn finish_pass(ctx: &SyncCtx, id: Option<i64>, s: &PassSummary, r: &Result<(), SyncError>) {
    let summary = serde_json::to_value(s).ok();
    match r {
        Ok(()) => finish(ctx, id, "ok", summary, None),
        Err(e) => finish(ctx, id, failure(e), summary, Some(e.to_string())),
    }
}

/// Finishes a reconcile's run: `ok` only when the range is proven exact (exit 0),
/// `differences` when some remain (exit 3).
pub fn finish_reconcile(
    ctx: &SyncCtx,
    id: Option<i64>,
    r: &Result<(ReconcileReport, PassSummary), SyncError>,
) {
    match r {
        Ok((report, repair)) => {
            let outcome = if report.proven() { "ok" } else { "differences" };
            let run = ReconcileRun::of(report, repair);
            finish(ctx, id, outcome, serde_json::to_value(&run).ok(), None)
        }
        Err(e) => finish(ctx, id, failure(e), None, Some(e.to_string())),
    }
}
