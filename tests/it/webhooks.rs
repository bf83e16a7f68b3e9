//! Unitalk webhooks in (#13 §4), through the real daemon: one ledger for both paths, the poller
//! as the safety net, forged deliveries refused.

use std::collections::HashMap;

use ubsync::sim::unitalk_webhooks::WebhookOptions;
use ubsync::store::Store;

use crate::cli_sync::{env, eventually, scenario, start_daemon, yesterday};
use crate::harness::{text, TestEnv};

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// Webhooks on, the scheduled sync an hour away: only webhooks push while the daemon runs.
fn webhook_config(env: &TestEnv, extra: &str) {
    std::fs::write(
        env.dir.path().join("slow.toml"),
        "timezone = \"Europe/Kyiv\"\n[[job]]\nname = \"sync\"\ncron = \"0 0 0 1 1 *\"\n",
    )
    .unwrap();
    env.write_config(
        "telephony",
        &format!(
            "[sync]\nstart = \"{}\"\n[schedule]\nfile = \"slow.toml\"\n[webhooks]\nunitalk_secret = \"{SECRET}\"\n{extra}",
            yesterday()
        ),
    );
}

/// How many times each EXTERNAL_CALL_ID is in Bitrix24 telephony.
fn registered(env: &TestEnv) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for c in env.sims.bitrix24.calls() {
        *m.entry(c.external_call_id.unwrap_or_default()).or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_call_lands_at_once_and_the_same_call_polled_later_lands_nowhere_again() {
    let env = env(scenario()).await;
    webhook_config(&env, "");
    let (mut child, base) = start_daemon(&env).await;
    let url = format!("{base}/unitalk/webhook/{SECRET}");
    // Duplicated and out of order, as a real sender may.
    let opts = WebhookOptions {
        duplicate: true,
        reverse: true,
        ..Default::default()
    };
    let statuses = env.sims.unitalk.deliver_webhooks(&url, &opts).await;
    assert!(
        !statuses.is_empty() && statuses.iter().all(|s| *s == 200),
        "{statuses:?}"
    );
    assert!(
        eventually(|| async { env.sims.bitrix24.stats().len() == 3 }).await,
        "the three external calls finished from webhooks alone: {:?}",
        registered(&env)
    );
    // The events path counts in the metrics like every pass (once its runs have ended).
    let metrics = || async {
        env.http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(
        eventually(|| async { metrics().await.contains("ubsync_calls_pushed_total 3") }).await,
        "{}",
        metrics().await
    );
    let metrics = metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ubsync_passes_total{job=\"events\"}") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        !metrics.contains("ubsync_bitrix24_requests_total 0\n"),
        "{metrics}"
    );
    child.kill().await.unwrap();
    // The poller, later: the same calls, under the same ids.
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let reg = registered(&env);
    assert_eq!(reg.len(), 3, "{reg:?}");
    assert!(reg.values().all(|n| *n == 1), "{reg:?}");
    assert_eq!(
        env.sims.bitrix24.tasks().len(),
        1,
        "one missed call, one task"
    );
    let store = Store::open(&env.dir.path().join("state/ubsync.db")).unwrap();
    assert_eq!(
        store.seen_counts().unwrap(),
        vec![("webhook".to_string(), 3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_webhook_is_caught_by_the_poller() {
    let s = scenario();
    let lost = s.calls[1].id;
    let env = env(s).await;
    webhook_config(&env, "");
    let (mut child, base) = start_daemon(&env).await;
    let url = format!("{base}/unitalk/webhook/{SECRET}");
    let opts = WebhookOptions {
        lose: [lost].into(),
        form: true,
        ..Default::default()
    };
    env.sims.unitalk.deliver_webhooks(&url, &opts).await;
    assert!(eventually(|| async { env.sims.bitrix24.stats().len() == 2 }).await);
    child.kill().await.unwrap();
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let reg = registered(&env);
    assert_eq!(reg.get(&format!("unitalk-{lost}")), Some(&1), "{reg:?}");
    assert!(reg.values().all(|n| *n == 1), "{reg:?}");
    let store = Store::open(&env.dir.path().join("state/ubsync.db")).unwrap();
    let counts: HashMap<String, i64> = store.seen_counts().unwrap().into_iter().collect();
    assert_eq!(
        counts.get("poll"),
        Some(&1),
        "the poller caught what webhooks missed: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_webhooks_change_nothing() {
    let env = env(scenario()).await;
    webhook_config(&env, "");
    let (mut child, base) = start_daemon(&env).await;
    for bad in [
        "wrong-secret-wrong-secret-wrong",
        "",
        "0123456789abcdef0123456789abcdeX",
    ] {
        let url = format!("{base}/unitalk/webhook/{bad}");
        let statuses = env
            .sims
            .unitalk
            .deliver_webhooks(&url, &WebhookOptions::default())
            .await;
        assert!(
            statuses.iter().all(|s| *s == 404 || *s == 405),
            "{bad}: {statuses:?}"
        );
        // Let the next attempt deliver again.
        env.sims.unitalk.forget_delivered();
    }
    child.kill().await.unwrap();
    assert!(env.sims.bitrix24.calls().is_empty());
    let store = Store::open(&env.dir.path().join("state/ubsync.db")).unwrap();
    assert_eq!(store.inbox_waiting().unwrap(), 0);
    assert!(store.ledger_rows().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_under_two_ids_is_caught_and_lands_once() {
    let env = env(scenario()).await;
    webhook_config(&env, "");
    let (mut child, base) = start_daemon(&env).await;
    let url = format!("{base}/unitalk/webhook/{SECRET}");
    // This account's dbid is not the history id.
    let opts = WebhookOptions {
        dbid_offset: 1_000_000,
        ..Default::default()
    };
    env.sims.unitalk.deliver_webhooks(&url, &opts).await;
    assert!(eventually(|| async { env.sims.bitrix24.stats().len() == 3 }).await);
    child.kill().await.unwrap();
    let out = env.ubsync(&["-v", "sync"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("the same call seems to arrive under two ids"),
        "logged loudly:\n{t}"
    );
    assert_eq!(env.sims.bitrix24.stats().len(), 3, "{:?}", registered(&env));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_left_waiting_when_a_route_is_turned_off_are_set_aside_not_retried_forever() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-21\"\n");
    let ctx = env.ctx().await;
    let now = env.clock.now();
    ctx.store
        .lock()
        .inbox_add("unitalk", "{\"event\":\"CALL_END\",\"call\":{}}", None, now)
        .unwrap();
    ctx.store
        .lock()
        .inbox_add("bitrix24", "event=ONEXTERNALCALLSTART", None, now)
        .unwrap();
    crate::harness::pass(&ctx).await.unwrap();
    assert_eq!(ctx.store.lock().inbox_waiting().unwrap(), 0);
}
