//! Bitrix24's limits through the real binary and under paused time (#19): a 429
//! `OPERATION_TIME_LIMIT` rests the method across processes, and every request of every kind
//! passes the one limiter.

use ubsync::sim::{Fault, FaultKind};

use crate::cli_sync::{env, scenario};
use crate::harness::text;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_without_a_reset_time_rests_batch_ten_minutes_across_passes() {
    let env = env(scenario()).await;
    env.sims
        .bitrix24
        .inject(Fault::once(Some("batch"), FaultKind::OperationLimit));
    let first = env.ubsync(&["sync"]).await;
    let t = text(&first);
    let batches = |env: &crate::harness::TestEnv| {
        env.sims
            .bitrix24
            .requests()
            .iter()
            .filter(|r| r.method == "batch")
            .count()
    };
    let after_first = batches(&env);
    assert!(
        t.contains("OPERATION_TIME_LIMIT") || t.contains("paused"),
        "{t}"
    );
    assert!(
        env.sims.bitrix24.stats().is_empty(),
        "the refused batch ran nothing"
    );
    // A pass moments later (a new process) still rests `batch`: the portal's window is ten
    // minutes when it names no reset time.
    let second = env.ubsync(&["sync"]).await;
    let t2 = text(&second);
    assert_eq!(
        batches(&env),
        after_first,
        "no batch inside the window: {t2}"
    );
    assert!(
        t2.contains("paused"),
        "the summary says why nothing was sent: {t2}"
    );
    let status = env.ubsync(&["status"]).await;
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_started_right_after_another_does_not_take_a_full_bucket_for_granted() {
    // Burst 50, 2 per second, as a portal has it; system time on both sides.
    let env = env(scenario()).await;
    {
        let first = env.ctx().await;
        for _ in 0..48 {
            first
                .b24
                .call("user.current", serde_json::json!({}))
                .await
                .unwrap();
        }
    }
    // The next process (a timer's next pass) starts at once: the portal's bucket is still full.
    let second = env.ctx().await;
    for _ in 0..6 {
        second
            .b24
            .call("user.current", serde_json::json!({}))
            .await
            .unwrap();
    }
    let refused: Vec<_> = env
        .sims
        .bitrix24
        .requests()
        .into_iter()
        .filter(|r| r.status == 503)
        .collect();
    assert!(refused.is_empty(), "over the portal's bucket: {refused:?}");
}
